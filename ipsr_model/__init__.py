"""IPU-Net model core in pure PyTorch: U-Net generator, multi-scale degradation, frozen FaceNet identity
network, identity-preserving loss and identification metrics. Never imports Ray or MLflow.

Nothing is re-exported here: callers import the modules (``ipsr_model.unet``, ``ipsr_model.errors``, ...), and
``ipsr_model.errors`` is imported by every Ray task of the jobs (for UserError), where importing torch would
cost each worker process ~1 s for nothing.
"""
