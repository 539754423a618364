# Images in the official MNIST training and test sets: what the checks expect unless told otherwise.
OFFICIAL_COUNTS = (60_000, 10_000)
# The two splits, in the order of OFFICIAL_COUNTS.
SPLITS = ("train", "test")
