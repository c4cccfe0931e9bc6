"""Max-pool settings the pool tests run through: each way a window can be laid out."""

POOLS = {
    "2x2": {"kernel_size": 2},
    "3x3-stride-2-pad-1": {"kernel_size": 3, "stride": 2, "padding": 1},  # overlapping windows
    "ceil": {"kernel_size": 2, "ceil_mode": True},
    "dilated": {"kernel_size": 2, "stride": 1, "dilation": 2},
    "rectangular": {"kernel_size": (2, 3), "stride": (1, 2)},
}
