"""The real vLLM CUDA path: JoyCaption's architecture on dummy weights. Skipped without a CUDA GPU."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ARCHITECTURE = Path(__file__).resolve().parents[3] / "shared" / "gpu" / "joycaption-architecture-config.json"


def test_joycaption_architecture_captions_on_cuda(tmp_path: Path):
    if not ARCHITECTURE.exists():
        pytest.skip("JoyCaption architecture config not found")
    from bench.bench_throughput import gpu_model, make_images
    from pipeline.captioning.images import pixels_to_image, prepare_image
    from pipeline.config import build_config
    from pipeline.engine.actor import CaptionActor
    from pipeline.testing.tiny_model import BOS_ID, IMAGE_TOKEN_ID

    model = gpu_model(tmp_path / "model")
    config = build_config({"input": {"uri": "unused"}, "output": {"uri": "unused"},
                           "model": {"path": str(model), "dtype": "bfloat16", "load_format": "dummy"},
                           "modes": "dual", "defaults": {"fixed_length": True, "max_tokens": 16}})
    actor = CaptionActor(config.model_dump_json())
    try:
        paths = make_images(tmp_path / "images", 4)
        images = [pixels_to_image(prepare_image(p.read_bytes(), p.name).pixels or b"") for p in paths]
        request, params = actor.request(paths[0].name, images[0], actor.modes[0])
        output = actor.llm.generate([request], [params], use_tqdm=False)[0]
        ids = list(output.prompt_token_ids)
        assert ids.count(BOS_ID) == 1 and ids.count(IMAGE_TOKEN_ID) == 729
        results = actor.caption([p.name for p in paths], images)
        assert all(g.tokens == mode.max_tokens for row in results for g, mode in zip(row, actor.modes, strict=True))
    finally:
        actor.shutdown()
