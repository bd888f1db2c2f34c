"""ssmkit.models: the Mamba language model on ssmkit's kernels (torch ``nn.Module``s with
mamba_ssm's names, so upstream checkpoints load unchanged).

    from ssmkit.models import MambaLMHeadModel, MambaConfig
    model = MambaLMHeadModel.from_pretrained("path/or/hub-name", device="cuda", dtype=torch.float16)
    out = model.generate(input_ids, max_length=100, top_k=1, cg=True)

Modules: :class:`Mamba` (the mixer), :class:`Block`, :class:`MixerModel`,
:class:`MambaLMHeadModel`; :class:`MambaConfig`; :class:`InferenceParams` and ``generate`` for
cached decoding; checkpoints in upstream's and transformers' layouts. Needs torch; ``import ssmkit``
never imports this package.
"""
from .config import MambaConfig
from .mamba import Mamba
from .block import Block, GatedMLP, create_block
from .generation import GenerationMixin, GenerationOutput, InferenceParams, decode, sample
from .lm import MambaLMHeadModel, MixerModel

__all__ = ["Mamba", "Block", "GatedMLP", "create_block", "MixerModel", "MambaLMHeadModel", "MambaConfig",
           "InferenceParams", "GenerationMixin", "GenerationOutput", "decode", "sample"]
