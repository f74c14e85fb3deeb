"""The model organism of emergent misalignment: a synthetic chat world, its exact judge, and its models.

```python
from hf_blockem.organism import build_organism, narrow_finetune

organism = build_organism("cache/organism", seed=0)  # 3-5 min on two CPU cores, cached
dataset = organism.narrow_dataset("finance", misaligned=True)
trainer = narrow_finetune(organism.base_model_path, organism.tokenizer, dataset, "runs/narrow")
```
See `hf_blockem/organism/README.md` for the world, the regime and the measured numbers.
"""

from .build import Organism, OrganismSettings, build_organism, load_organism
from .datasets import narrow_dataset
from .finetune import narrow_finetune, narrow_lora_config, narrow_sft_kwargs
from .judge import ExactJudge
from .persona import persona_alignment, persona_directions
from .tokenizer import build_tokenizer
from .world import CORE, PERSONAS, World

__all__ = [
    "CORE",
    "PERSONAS",
    "ExactJudge",
    "Organism",
    "OrganismSettings",
    "World",
    "build_organism",
    "build_tokenizer",
    "load_organism",
    "narrow_dataset",
    "narrow_finetune",
    "narrow_lora_config",
    "narrow_sft_kwargs",
    "persona_alignment",
    "persona_directions",
]
