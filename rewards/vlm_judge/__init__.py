"""VLM judges served by any OpenAI-compatible server (vLLM first): client, scoring, prompts, judges.

Serve a VLM (one or several servers), e.g. `vllm serve Qwen/Qwen2.5-VL-7B-Instruct`, and name the
judges in a recipe; `editrl judge --recipe R --data DIR` checks them on a folder of edits first:

    rewards:
      on_failure: skip            # a sample the judge could not score is excluded (fail: stop the run)
      terms:
        - name: vlm_fidelity
          weight: 1.0
          options:
            model: Qwen/Qwen2.5-VL-7B-Instruct
            base_urls: [http://judge-1:8000/v1, http://judge-2:8000/v1]   # round-robin, failover on retry
            api_key_env: JUDGE_API_KEY   # the variable's name; the key never appears in recipes or logs
            frames: 4                    # per video: fidelity sends 2 x 4 frames (+ the reference image)
        - {name: vlm_preservation, weight: 1.0, options: {model: Qwen/Qwen2.5-VL-7B-Instruct}}
        - {name: vlm_aesthetics, weight: 0.5, options: {model: Qwen/Qwen2.5-VL-7B-Instruct, layout: grid}}

Two edit rubrics ask several questions each and combine the answers: `edit_reward` (EditReward's instruction
following + visual quality, 1-4 each, overall their sum) and `viescore` (GEdit-Bench's VIEScore: SC, PQ and their
geometric mean on 0-10); their details (each score, the overall) are in the reward's extras.

Prompts are Jinja templates (prompts/*.txt); copy one, edit it and point the `prompt` option at it (a rubric takes
one per question: `prompt: {sc: my_sc.txt}`).
"""

from editrl.rewards.vlm_judge.client import ClientOptions, JudgeClient, JudgeUnavailable
from editrl.rewards.vlm_judge.judges import (
    Aesthetics,
    EditReward,
    Fidelity,
    JudgeOptions,
    Preservation,
    Question,
    VieScore,
    VlmJudge,
)

__all__ = [
    "Aesthetics",
    "ClientOptions",
    "EditReward",
    "Fidelity",
    "JudgeClient",
    "JudgeOptions",
    "JudgeUnavailable",
    "Preservation",
    "Question",
    "VieScore",
    "VlmJudge",
]
