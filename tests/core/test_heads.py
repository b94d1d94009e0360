import pytest
import torch
from torch import nn

from kswap import (
    GrownRows,
    SwapConfigError,
    check_head_size,
    extend_embedding,
    extend_head,
    grow_checkpoint_rows,
    hidden_new_classes,
    imprinted_rows,
    replace_module,
    sigmoid_prior_bias,
)


def test_extend_head_keeps_old_rows_bit_identical():
    old = nn.Linear(16, 10)
    new = extend_head(old, 4)
    assert (new.in_features, new.out_features) == (16, 14)
    assert torch.equal(new.weight[:10], old.weight) and torch.equal(new.bias[:10], old.bias)
    assert torch.equal(new.bias[10:], torch.zeros(4))
    bound = (6 / (16 + 4)) ** 0.5  # xavier_uniform on the (K, d) slice, as the reference
    assert new.weight[10:].abs().max() <= bound and new.weight[10:].abs().max() > 0
    assert not any(p.requires_grad for p in new.parameters())
    assert all(p.requires_grad for p in extend_head(old, 1, trainable=True).parameters())


def test_extend_head_before_trailing_no_object_row():
    old = nn.Linear(8, 6)  # 5 classes + "no object"
    new = extend_head(old, 3, trailing_rows=1)
    assert new.out_features == 9
    assert torch.equal(new.weight[:5], old.weight[:5]) and torch.equal(new.weight[-1], old.weight[-1])
    assert torch.equal(new.bias[-1], old.bias[-1]) and torch.equal(new.bias[5:8], torch.zeros(3))
    x = torch.randn(4, 8)
    out_old, out_new = old(x), new(x)
    torch.testing.assert_close(out_new[:, :5], out_old[:, :5])
    torch.testing.assert_close(out_new[:, -1], out_old[:, -1])


class TaggedConv(nn.Conv2d):
    """A Conv2d subclass with an attribute of its own, as detectron2's ``layers.Conv2d``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tag = "predictor"


def test_extend_conv_predictor_keeps_its_type_and_old_channels():
    old = TaggedConv(8, 5, kernel_size=1)
    new = extend_head(old, 2)
    assert type(new) is TaggedConv and new.tag == "predictor" and new.out_channels == 7
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(new(x)[:, :5], old(x), rtol=0, atol=0)
    with pytest.raises(SwapConfigError, match="nn.Linear or nn.Conv2d"):
        extend_head(nn.Embedding(5, 8), 1)


def test_grow_checkpoint_rows_inserts_the_models_new_rows_before_trailing_ones():
    old = nn.Linear(4, 6)  # 5 classes + "no object"
    new = extend_head(old, 2, trailing_rows=1)
    grown = {"weight": GrownRows(6, 8, 1), "bias": GrownRows(6, 8, 1)}
    state = {"weight": old.weight.detach().clone(), "bias": old.bias.detach().clone()}
    assert grow_checkpoint_rows(state, new.state_dict(), grown) == ["weight", "bias"]
    assert torch.equal(state["weight"], new.weight) and torch.equal(state["bias"], new.bias)
    assert grow_checkpoint_rows(state, new.state_dict(), grown) == []  # already grown (a resume): left as it is


def test_extend_sigmoid_head_uses_prior_bias():
    old = nn.Linear(8, 80)
    new = extend_head(old, 5, bias=sigmoid_prior_bias(0.01), init="zeros")
    assert torch.sigmoid(new.bias[80:]).allclose(torch.full((5,), 0.01))
    assert torch.equal(new.weight[80:], torch.zeros(5, 8))


def test_extend_embedding_and_dtype_preserved():
    old = nn.Embedding(7, 4).double()
    new = extend_embedding(old, 2)
    assert new.weight.dtype == torch.float64 and new.num_embeddings == 9
    assert torch.equal(new.weight[:7], old.weight) and not new.weight.requires_grad


@pytest.mark.parametrize("n_new, trailing", [(0, 0), (2, 6), (1, -1)])
def test_extend_head_bad_arguments(n_new, trailing):
    with pytest.raises(SwapConfigError):
        extend_head(nn.Linear(4, 6), n_new, trailing_rows=trailing)
    with pytest.raises(SwapConfigError, match="Unknown head init"):
        extend_head(nn.Linear(4, 6), 1, init="orthogonal")


def test_check_head_size():
    check_head_size(11, 10, trailing_rows=1)
    with pytest.raises(SwapConfigError, match=r"has 12 outputs, but 10 pretrained classes need 10 outputs\."):
        check_head_size(12, 10)
    with pytest.raises(SwapConfigError, match=r"need 11 outputs \(10 classes \+ 1 trailing\)"):
        check_head_size(12, 10, trailing_rows=1)


@pytest.mark.parametrize("make", [lambda: nn.Linear(4, 6), lambda: nn.Embedding(6, 4)])
def test_new_rows_are_made_on_the_old_weights_device(make):
    old = make().to("meta")
    new = extend_head(old, 2) if isinstance(old, nn.Linear) else extend_embedding(old, 2)
    assert all(p.device.type == "meta" for p in new.parameters())
    assert new.weight.shape[0] == 8


def test_hidden_new_classes_predicts_as_the_pretrained_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6))  # 5 classes + "no object"
    conv = nn.Conv2d(8, 5, 1)
    x = torch.randn(64, 8)
    pretrained_probs = model(x).softmax(-1)
    pretrained_map = conv(x[:, :, None, None].expand(-1, -1, 3, 3))
    model[2] = extend_head(model[2], 3, trailing_rows=1)
    grown_conv = extend_head(conv, 3)
    # xavier rows with a large norm take the argmax somewhere: the grown model is not the pretrained one
    with torch.no_grad():
        model[2].weight[5:8] *= 50
    assert not torch.equal(model(x).argmax(-1), pretrained_probs.argmax(-1))
    grown = {"2.weight": GrownRows(6, 9, trailing=1), "2.bias": GrownRows(6, 9, trailing=1)}
    with hidden_new_classes(model, grown):
        probs = model(x).softmax(-1)
    torch.testing.assert_close(probs[:, :5], pretrained_probs[:, :5])
    torch.testing.assert_close(probs[:, 8], pretrained_probs[:, 5])  # "no object" stays last
    assert probs[:, 5:8].max() == 0
    assert model[2](x)[:, 5:8].abs().max() < 1e4  # the hooks are gone after the block
    with hidden_new_classes(grown_conv, {"weight": GrownRows(5, 8)}):
        scores = grown_conv(x[:, :, None, None].expand(-1, -1, 3, 3))
    torch.testing.assert_close(scores[:, :5], pretrained_map)
    assert torch.sigmoid(scores[:, 5:]).max() == 0
    embedding = nn.Sequential(nn.Embedding(9, 4))  # grown inputs are left alone
    with hidden_new_classes(embedding, {"0.weight": GrownRows(6, 9)}):
        assert torch.equal(embedding(torch.tensor([7])), embedding[0].weight[7:8])


def test_replace_module():
    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.Linear(3, 4)))
    new = nn.Linear(3, 5)
    old = replace_module(model, "1.0", new)
    assert model[1][0] is new and old.out_features == 4


def test_imprinted_rows_point_at_the_class_mean_with_the_old_rows_norm():
    old = nn.Linear(4, 6)  # 5 classes + "no object"
    with torch.no_grad():
        old.weight.copy_(torch.arange(24.0).reshape(6, 4))
    features = torch.tensor([[3.0, 0, 0, 4], [0, 1, 0, 0]])
    rows = imprinted_rows(old.weight, features, trailing_rows=1)
    mean_norm = old.weight[:5].norm(dim=1).mean()
    torch.testing.assert_close(rows.norm(dim=1), mean_norm.expand(2))
    torch.testing.assert_close(rows[0] / rows[0].norm(), torch.tensor([0.6, 0, 0, 0.8]))
    grown = extend_head(old, 2, trailing_rows=1, new_weight=rows)
    torch.testing.assert_close(grown.weight[5:7], rows)
    assert torch.equal(grown.weight[7], old.weight[5])
    with pytest.raises(SwapConfigError, match="class_features must be"):
        imprinted_rows(old.weight, torch.zeros(2, 3))
    with pytest.raises(SwapConfigError, match="new_weight has shape"):
        extend_head(old, 3, new_weight=rows)
