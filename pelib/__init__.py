"""pelib: parameter-efficient fine-tuning, built from scratch in the notebooks of this course.

One module per technique (see the notebooks for the derivations):
    inject   find target modules by name, wrap them, freeze the rest, count parameters
    adapter  bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2020)
    prefix   prefix tuning (Li & Liang 2021), with the MLP reparametrisation
    lora     LoRA (Hu et al. 2021): W + (alpha/r) B A, merge/unmerge
    adalora  AdaLoRA (Zhang et al. 2023): P Lambda Q triplets, importance, budget (RankAllocator)
    sora     SoRA (Ding et al. 2023): gated LoRA, proximal soft-threshold, pruning to LoRA
    dora     DoRA (Liu et al. 2024): LoRA on the direction, a trained magnitude per output
    io       adapter files in peft's format (knows no method); files: atomic writes
    recipe   the base of every method's config: its tuned defaults, its adapter file fields
    methods  the registry: each method's config, builders per implementation, loaders
    peers    the peer library's (peft, bitsandbytes) builds of the same methods
    backbone the packaged pretrained models (MiniLM, SmolLM2), offline
    data     Banking77 / CLINC150, shipped in pelib/_data/
    train    the training loop, which knows no method: hooks (the protocol, LP-FT's probe head,
             the floor's feature cache), batching, optim (AdamW's groups), schedule,
             checkpoint, evaluation, settings (one check for the API and the CLI); metrics
    options, runs, report   the finetune options (from the registry), run identity, locks
             and records, tables and figures: shared by finetune and compare
    probe    the linear probe fitted to convergence, and LP-FT's head initialisation
    quant    NF4/FP4 code maps, blockwise (double) quantisation, Linear4bit,
             QLoRA (apply_qlora, merge_qlora)
    kernels  Triton kernels with pure-torch references
    finetune, compare, bench   the command line (`python -m pelib ...`)
"""
# Importing pelib changes nothing outside it: no environment variable, no global mode. The
# backbones load with local_files_only=True; the command line (pelib/__main__.py) turns the
# whole process offline.
__version__ = "0.1.0"


from . import metrics, probe, quant, train  # noqa: E402  (pelib.train.train, pelib.quant.quantize_4bit)
from .adalora import RankAllocator, apply_adalora  # noqa: E402
from .adapter import apply_adapters  # noqa: E402
from .backbone import load_backbone, tiny_backbone  # noqa: E402
from .data import load_nlu  # noqa: E402
from .dora import apply_dora  # noqa: E402
from .inject import count_parameters, trainable_parameters  # noqa: E402
from .lora import LoRALinear, apply_lora  # noqa: E402
from .methods import METHODS, load_adapter, save_adapter  # noqa: E402
from .train import TrainConfig  # noqa: E402

# every method's recipe (pelib.LoRAConfig, pelib.SoRAConfig, ...), read from the registry
globals().update({m.config.__name__: m.config for m in METHODS.values()})
from .prefix import apply_prefix  # noqa: E402
from .quant import apply_qlora, merge_qlora  # noqa: E402
from .sora import SoRA, apply_sora  # noqa: E402
