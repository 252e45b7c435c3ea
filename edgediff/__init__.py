"""edgediff: a compiler for trained diffusion models, from PyTorch to edge runtimes."""

import logging as _logging

__version__ = "0.1.0"

# diffusers imports torchao when it is installed (litert-torch brings it); its CUDA-only
# extensions and torch's pytree deprecation notes print warnings that mean nothing here.
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
