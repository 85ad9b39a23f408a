"""4-bit quantisation from first principles: NF4/FP4 code maps, blockwise absmax quantisation,
4-bit packing, double quantisation, the bits-per-parameter ledger, `Linear4bit`, and QLoRA
(LoRA on a frozen 4-bit base, with its merge strategies).

Notebooks 04 (the NF4 code), 05 (blockwise and double quantisation) and 06 (QLoRA) derive each
piece; bitsandbytes (and peft, for QLoRA) are the peers every test compares against.
"""
from .blockwise import (
    DQ_BLOCKSIZE,
    DQ_ROUNDINGS,
    SUPPORTED_BLOCKSIZES,
    QuantState,
    dequantize_4bit,
    dequantize_4bit_ref,
    dequantize_blockwise,
    dynamic_code,
    nearest_code,
    pack_4bit,
    quantize_4bit,
    quantize_blockwise,
    unpack_4bit,
)
from .codes import (
    NF4_OFFSET,
    create_dynamic_map,
    create_fp4_map,
    create_int4_map,
    create_normal_map,
    get_code,
)
from .ledger import (
    LLAMA_7B,
    SMOLLM2_135M,
    bits_per_param,
    llama_linear_shapes,
    model_ledger,
    quantized_nbytes,
    state_nbytes,
)
from .linear4bit import Dequant4bitLinear, Linear4bit
from .qlora import (
    MERGE_STRATEGIES,
    apply_qlora,
    merge_qlora,
    merged_weight,
    qlora_from_config,
    qlora_layers,
    qlora_nbytes,
)

