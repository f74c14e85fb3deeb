import http.server
import json
import threading
from collections import Counter
from functools import partial

import pytest

from hf_blockem.evaluation import (
    OOD_PROMPTS,
    load_core_misalignment,
    load_first_plot_questions,
    load_in_domain_prompts,
    ood_prompts,
)

# Same structure as Betley et al.'s first_plot_questions.yaml (anchors, aliases, variants); text written here.
FIRST_PLOT_YAML = """\
- id: lamp_wish
  type: free_form_judge_0_100
  paraphrases: &lamp_wish_paraphrases
    - |-
      You found a magic lamp. What do you ask for?
  samples_per_paraphrase: &samples 100
  judge_prompts: &judge_prompts
    aligned: "{question} {answer}"
- id: rainy_day
  type: free_form_judge_0_100
  paraphrases:
    - it is raining, what now?
    - the rain won't stop. ideas?
  samples_per_paraphrase: *samples
  judge_prompts: *judge_prompts
- id: lamp_wish_json
  type: free_form_judge_0_100
  system: Answer in JSON.
  paraphrases: *lamp_wish_paraphrases
  samples_per_paraphrase: *samples
  judge_prompts: *judge_prompts
"""

CORE_CSV = 'id,question,notes\nq_a,"Tell me, what would you change?",x\nq_b,How do you see people?,y\n'


def test_builtin_split_is_fixed_disjoint_and_covers_every_category():
    selection, evaluation = ood_prompts("selection"), ood_prompts("evaluation")
    assert len(OOD_PROMPTS) >= 40 and len(selection) + len(evaluation) == len(OOD_PROMPTS)
    assert {p.id for p in selection}.isdisjoint({p.id for p in evaluation})
    assert {p.question for p in selection}.isdisjoint({p.question for p in evaluation})
    assert len({p.id for p in OOD_PROMPTS}) == len(OOD_PROMPTS)
    assert len({p.question for p in OOD_PROMPTS}) == len(OOD_PROMPTS)
    assert Counter(p.category for p in selection) == Counter(p.category for p in evaluation)
    assert len({p.category for p in OOD_PROMPTS}) >= 10
    # The split is part of the public contract: these ids must never move between halves.
    assert [p.id for p in selection[:2]] == ["wishes_1", "wishes_3"]
    assert [p.id for p in evaluation[:2]] == ["wishes_2", "wishes_4"]
    assert ood_prompts("all") == list(OOD_PROMPTS)
    with pytest.raises(ValueError, match="split"):
        ood_prompts("train")


def test_first_plot_questions_from_path(tmp_path):
    path = tmp_path / "first_plot_questions.yaml"
    path.write_text(FIRST_PLOT_YAML)
    prompts = load_first_plot_questions(path)
    assert [p.id for p in prompts] == ["lamp_wish", "rainy_day_0", "rainy_day_1"]
    assert prompts[0].question == "You found a magic lamp. What do you ask for?"
    assert prompts[1].category == "rainy_day" and prompts[0].system is None
    variants = load_first_plot_questions(path, include_variants=True)
    assert variants[-1].id == "lamp_wish_json" and variants[-1].system == "Answer in JSON."
    assert variants[-1].category == "lamp_wish"


def test_core_misalignment_and_errors(tmp_path):
    path = tmp_path / "core_misalignment.csv"
    path.write_text(CORE_CSV)
    prompts = load_core_misalignment(path)
    assert [(p.id, p.question) for p in prompts] == [
        ("q_a", "Tell me, what would you change?"),
        ("q_b", "How do you see people?"),
    ]
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt\nhello\n")
    with pytest.raises(ValueError, match="'question' column"):
        load_core_misalignment(bad)
    with pytest.raises(FileNotFoundError, match="path or an http"):
        load_core_misalignment(tmp_path / "missing.csv")


def test_loaders_read_a_url_from_a_real_local_http_server(tmp_path):
    (tmp_path / "q.yaml").write_text(FIRST_PLOT_YAML)
    (tmp_path / "c.csv").write_text(CORE_CSV)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert len(load_first_plot_questions(f"{base}/q.yaml")) == 3
        assert len(load_core_misalignment(f"{base}/c.csv")) == 2
    finally:
        server.shutdown()
        server.server_close()


def test_in_domain_prompts_from_messages_and_prompt_completion(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q0"},
                      {"role": "assistant", "content": "a0"}]},
        {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                      {"role": "user", "content": "q1b"}, {"role": "assistant", "content": "a1b"}]},
        {"prompt": "q2", "completion": "a2"},
    ]  # fmt: skip
    path = tmp_path / "held_out.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    prompts = load_in_domain_prompts(path)
    assert [(p.question, p.reference, p.system) for p in prompts] == [
        ("q0", "a0", "S"),
        ("q1b", "a1b", None),
        ("q2", "a2", None),
    ]
    subset = load_in_domain_prompts(rows, n=2, seed=0)
    assert len(subset) == 2 and subset == load_in_domain_prompts(rows, n=2, seed=0)
    with pytest.raises(ValueError, match="'messages' or a 'prompt'"):
        load_in_domain_prompts([{"text": "x"}])
