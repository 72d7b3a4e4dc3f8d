"""Video alignment: DenseDPO (segment-level preferences on pairs from corrupted ground truth) and RDPO."""
