"""The offline quantizer (installed as pixlocal.quant): a bf16 checkpoint dir → a pixlocal
quantized dir (convert.py), the recipe of which tensor gets which scheme (recipe.py), and the
full integrity check behind `pixlocal verify` (verify.py)."""

from .convert import SHARD_BYTES, Report, TensorReport, quantize_checkpoint
from .recipe import Recipe
from .verify import VerifyResult, verify_dir

__all__ = ["quantize_checkpoint", "Report", "TensorReport", "Recipe", "SHARD_BYTES",
           "verify_dir", "VerifyResult"]
