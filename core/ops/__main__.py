"""``python -m kswap.ops``: say which multi-scale deformable attention kernel serves (building it if needed)."""

from .extension import kernel_info

if __name__ == "__main__":
    print(kernel_info())
