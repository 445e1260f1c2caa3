"""Training-time compression: one resumable trainer (`trainer`), its data (`data`) and losses
(`losses`), shared by distillation, layer-wise distillation and quantization-aware training."""
