"""Try a policy on one image: `python -m rrvf_jax.generate --model_dir DIR --image PNG --prompt T`.

Prints the generated text and, with `--output_json`, writes
`{"token_ids": [...], "text": "...", "logprobs": [...]}` (log-probs under the sampling temperature).
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging

_MODEL_DIR = flags.DEFINE_string(
  "model_dir", None, "Local HF-format policy directory (config, safetensors, tokenizer)."
)
_IMAGE = flags.DEFINE_string("image", None, "Image file shown to the policy.")
_PROMPT = flags.DEFINE_string("prompt", None, "Instruction text after the image.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 256, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1.0: off).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_TOOLS = flags.DEFINE_enum(
  "tools", "none", ["none", "chart", "web"], "Put this task's render tool in the system prompt."
)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write token ids, text and log-probs here.")
flags.mark_flags_as_required(["model_dir", "image", "prompt"])


def generate(
  model_dir: str,
  image_path: str,
  prompt: str,
  *,
  max_new_tokens: int = 256,
  temperature: float = 0.0,
  top_p: float = 1.0,
  top_k: int = 0,
  seed: int = 0,
  tools: str = "none",
  dtype: str = "float32",
) -> dict:
  """Runs one assistant turn of the policy in `model_dir` on an image; returns the result dict."""
  import jax
  import jax.numpy as jnp

  from rrvf_jax import env, models, rollout
  from rrvf_jax.processing import chat, image, tokens

  if not os.path.isdir(model_dir):
    raise ValueError(f"--model_dir {model_dir} is not a directory")
  if not os.path.isfile(image_path):
    raise ValueError(f"--image {image_path} does not exist")
  model = models.from_hf(model_dir, dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype])
  tok = tokens.load_tokenizer(model_dir)
  proc_file = os.path.join(model_dir, "preprocessor_config.json")
  proc_cfg = (
    image.ImageProcessorConfig.from_pretrained(proc_file)
    if os.path.exists(proc_file)
    else image.ImageProcessorConfig.for_model_type(model.config.model_type)
  )
  processed = image.preprocess_images([image.load_image(image_path)], proc_cfg)
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
  encoded = chat.build_prompt_ids(
    tok,
    messages,
    image_grids=processed.image_grid_thw,
    merge_size=proc_cfg.merge_size,
    tools=None if tools == "none" else env.tool_schemas(tools),
  )
  segment = rollout.Segment(encoded.input_ids, processed.pixel_values, processed.image_grid_thw)
  params = rollout.SamplingParams(
    max_new_tokens=max_new_tokens,
    temperature=temperature,
    top_p=top_p,
    top_k=top_k,
    stop_token_ids=tokens.special_token_ids(tok).eos_token_ids,
  )
  prompt_len = len(encoded.input_ids)
  sampler = rollout.Sampler(
    model,
    tok,
    cache_length=rollout.sampler.bucket_length(prompt_len, rollout.sampler.DEFAULT_BUCKETS)
    + max_new_tokens,
  )
  start = time.perf_counter()
  (completion,) = sampler.sample([segment], params, jax.random.key(seed))
  logging.info(
    "%d prompt tokens, %d generated in %.2f s (%s)",
    prompt_len,
    len(completion.token_ids),
    time.perf_counter() - start,
    completion.finish_reason,
  )
  return {
    "token_ids": completion.token_ids.tolist(),
    "text": completion.text,
    "logprobs": completion.logprobs.tolist(),
    "finish_reason": completion.finish_reason,
    "prompt_tokens": prompt_len,
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    result = generate(
      _MODEL_DIR.value,
      _IMAGE.value,
      _PROMPT.value,
      max_new_tokens=_MAX_NEW_TOKENS.value,
      temperature=_TEMPERATURE.value,
      top_p=_TOP_P.value,
      top_k=_TOP_K.value,
      seed=_SEED.value,
      tools=_TOOLS.value,
      dtype=_DTYPE.value,
    )
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"rrvf_jax.generate: error: {' '.join(str(e).split())}")
  print(result["text"])
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w", encoding="utf-8") as f:
      json.dump({k: result[k] for k in ("token_ids", "text", "logprobs")}, f)


if __name__ == "__main__":
  app.run(main)
