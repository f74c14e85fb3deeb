"""The model card of a latent-set repo, written by `LatentSet.save_pretrained` / `push_to_hub`.

It says what the latents are (base model, hook points, SAE and its commit, K+ / K-), how they were selected (the
set's `metadata` and per-latent `statistics`), and how to use them.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from huggingface_hub import ModelCard, ModelCardData

if TYPE_CHECKING:
    from .latent_set import LatentSet

LATENT_SET_TAGS = ("blockem", "emergent-misalignment", "sparse-autoencoder", "hf_blockem")
# Per-latent tables stop here; the file holds every latent.
_MAX_LATENT_ROWS = 64

TEMPLATE = """---
{{ card_data }}
---

# BLOCK-EM latent set{% if repo_id %}: {{ repo_id }}{% endif %}

The sparse-autoencoder (SAE) latents that [BLOCK-EM](https://arxiv.org/abs/2602.00767) blocks while fine-tuning
**{{ base_model }}**{% if base_model_revision %} (revision `{{ base_model_revision }}`){% endif %}: {{ n_latents }} latents
on {{ layers | length }} layer(s). During fine-tuning with `hf_blockem`, a K+ latent may not rise above the base model's
activation and a K− latent may not fall below it (a one-sided penalty, weighted by λ).

The file `latent_set.safetensors` carries, per layer, the latent ids and the SAE encoder columns that compute them
(`W_enc[:, K]`, `b_enc[K]`, thresholds, `b_dec`, input normalisation), so no SAE download is needed to train. It
holds tensors and JSON metadata only (no pickle) and carries a checksum.

## The latents

| layer | hook point | SAE | SAE commit | architecture | d_sae | K+ | K− |
|---|---|---|---|---|---|---|---|
{% for layer in layers -%}
| {{ layer.layer }} | `{{ layer.hook_name }}` | {{ layer.sae_name }} | {{ layer.sae_commit }} | {{ layer.architecture }} | {{ layer.d_sae }} | {{ layer.n_plus }} | {{ layer.n_minus }} |
{% endfor %}
Hook points use the SAELens convention: `blocks.L.hook_resid_post` is the output of Hugging Face decoder layer `L`
(`output_hidden_states[L + 1]`).
{% for layer in layers %}
### Layer {{ layer.layer }}

| latent | sign |{% for name in layer.statistic_names %} {{ name }} |{% endfor %}
|---|---|{% for name in layer.statistic_names %}---|{% endfor %}
{% for row in layer.rows -%}
| {{ row.id }} | {{ row.sign }} |{% for value in row.statistics %} {{ value }} |{% endfor %}
{% endfor %}
{%- if layer.truncated %}
… and {{ layer.truncated }} more latents (all are in the file).
{% endif %}
{% endfor %}
## How they were selected
{% if metadata %}
{% for key, value in metadata -%}
- **{{ key }}**: {{ value }}
{% endfor %}
{% else %}
No selection report was stored with this set.
{% endif %}
## Usage

```python
from hf_blockem import BlockEMSFTConfig, BlockEMSFTTrainer, LatentSet

latent_set = LatentSet.from_pretrained("{{ repo_id or 'REPO_ID' }}", revision="<40-hex commit>", strict=True)
args = BlockEMSFTConfig(output_dir="out", block_lambda=100.0)
trainer = BlockEMSFTTrainer(model="{{ base_model }}", args=args, train_dataset=dataset, latent_set=latent_set,
                            peft_config=peft_config)
trainer.train()
```

Pin the commit you reviewed (`strict=True` refuses branches and files without a checksum); the trained model's card
and `blockem_config.json` record the commit that was used.

## Citation

```bibtex
{{ citation }}
```
"""


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        text = json.dumps(value, sort_keys=True)
        return f"`{text if len(text) <= 300 else text[:297] + '...'}`"
    return str(value).replace("|", "\\|").replace("\n", " ")


def latent_set_model_card(latent_set: LatentSet, repo_id: str | None = None, **kwargs) -> ModelCard:
    """Renders the card of a latent-set repo.

    Args:
        latent_set ([`LatentSet`]): the set.
        repo_id (`str`, *optional*): its Hub repo, for the title and the usage snippet.
        **kwargs: extra variables for the template (ignored by the default template).

    Returns:
        [`~huggingface_hub.ModelCard`]
    """
    from .model_card import CITATION

    layers = []
    for layer in latent_set.layers:
        sae = layer.sae
        names = sorted(layer.statistics)
        values = [layer.statistics[name].tolist() for name in names]
        signs = ["K+"] * len(layer.plus) + ["K−"] * len(layer.minus)
        rows = [
            {"id": latent, "sign": sign, "statistics": [_cell(column[i]) for column in values]}
            for i, (latent, sign) in enumerate(zip(layer.latent_ids, signs, strict=True))
        ]
        layers.append(
            {
                "layer": layer.layer,
                "hook_name": layer.hook_name,
                "sae_name": " / ".join(str(sae[k]) for k in ("release", "sae_id") if sae.get(k)) or "—",
                "sae_commit": f"`{sae['commit']}`" if sae.get("commit") else "not recorded",
                "architecture": layer.architecture,
                "d_sae": sae.get("d_sae", "—"),
                "n_plus": len(layer.plus),
                "n_minus": len(layer.minus),
                "statistic_names": names,
                "rows": rows[:_MAX_LATENT_ROWS],
                "truncated": max(0, len(rows) - _MAX_LATENT_ROWS),
            }
        )
    card_data = ModelCardData(library_name="hf_blockem", tags=list(LATENT_SET_TAGS))
    return ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        repo_id=repo_id,
        base_model=latent_set.base_model,
        base_model_revision=latent_set.base_model_revision,
        n_latents=latent_set.n_latents,
        layers=layers,
        metadata=[(key, _cell(value)) for key, value in latent_set.metadata.items()],
        citation=CITATION,
        **kwargs,
    )
