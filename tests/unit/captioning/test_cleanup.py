"""Caption clean-up: the rules on real JoyCaption-style text, the config that turns them on, the fingerprint
that must not move while they are off, and the write stage that applies them and keeps the raw text."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.captioning.cleanup import RULES_VERSION, clean_caption, clean_column, clean_tags, normalise_whitespace
from pipeline.config import CleanupConfig, ConfigError, TagCleanup, build_config
from pipeline.exports.jsonl import export_jsonl
from pipeline.exports.table import open_output
from pipeline.exports.txt import export_txt
from pipeline.run.commit import CommitRequest, commit_shard
from pipeline.run.stages import write_stage
from pipeline.table.fragments import merge_shard, write_expected
from pipeline.table.ledger import Ledger
from pipeline.table.manifest import RunMetadata
from pipeline.table.names import part_path, staging_dir
from pipeline.table.records import WriteReport
from pipeline.table.schema import in_flight_schema, output_schema, to_table
from pipeline.table.status import status
from tests.unit.config.test_settings import REPO, base

PROSE = CleanupConfig(strip_meta_openings=True, normalise_whitespace=True)

# (what kind of caption, the model's text, after strip_meta_openings + normalise_whitespace)
CHANGED = [
    ("descriptive", "This image shows a golden retriever lying on a faded blue rug, its head resting on its paws.",
     "A golden retriever lying on a faded blue rug, its head resting on its paws."),
    ("descriptive, the seed README's own caption",
     "This image is a digital meme featuring a photograph of a golden retriever walking on a wet asphalt road.",
     "A digital meme featuring a photograph of a golden retriever walking on a wet asphalt road."),
    ("descriptive", "This is a photograph of a young woman with long, wavy auburn hair, standing in a sunlit field.",
     "A photograph of a young woman with long, wavy auburn hair, standing in a sunlit field."),
    ("descriptive", "The image is a close-up photograph of a hummingbird hovering beside a red hibiscus flower.",
     "A close-up photograph of a hummingbird hovering beside a red hibiscus flower."),
    ("descriptive", "This image is a digital illustration in an anime style, depicting a girl with silver hair.",
     "A digital illustration in an anime style, depicting a girl with silver hair."),
    ("descriptive", "This is an image of an old stone bridge crossing a narrow river in autumn.",
     "An old stone bridge crossing a narrow river in autumn."),
    ("straightforward", "The image shows a vintage red bicycle leaning against a brick wall, a wicker basket on front.",
     "A vintage red bicycle leaning against a brick wall, a wicker basket on front."),
    ("straightforward", "In this image, a man in a yellow raincoat walks a terrier along a wet cobblestone street.",
     "A man in a yellow raincoat walks a terrier along a wet cobblestone street."),
    ("straightforward", "The picture shows two children flying a kite on a grassy hill under a cloudy sky.",
     "Two children flying a kite on a grassy hill under a cloudy sky."),
    ("straightforward, the medium is kept",
     "This photograph captures a serene mountain lake at dawn, mist rising off the water.",
     "A photograph of a serene mountain lake at dawn, mist rising off the water."),
    ("straightforward, the medium is kept", "This digital illustration depicts a knight in silver armor on a cliff.",
     "A digital illustration of a knight in silver armor on a cliff."),
    ("descriptive, a lead-in line",
     "Here is a description of the image:\n\nA snow-covered cabin nestled among pine trees under a starry sky.",
     "A snow-covered cabin nestled among pine trees under a starry sky."),
    ("descriptive, a lead-in, then an opening",
     "Sure! Here's a detailed caption for the image: This image shows a lighthouse on a rocky cliff at sunset.",
     "A lighthouse on a rocky cliff at sunset."),
    ("descriptive", "In this image we can see a dog running through shallow waves on a beach.",
     "A dog running through shallow waves on a beach."),
    ("descriptive, the README's second meta phrase", "You are looking at a close-up of a dew-covered spider web.",
     "A close-up of a dew-covered spider web."),
    ("descriptive, mixed-case brand kept", "This image shows iPhone packaging on a white marble countertop.",
     "iPhone packaging on a white marble countertop."),
    ("descriptive casual", "In this pic, a dude is skateboarding down a concrete ramp at a skate park.",
     "A dude is skateboarding down a concrete ramp at a skate park."),
    ("art critic", "The image presents a striking study in chiaroscuro, where a single candle lights a face.",
     "A striking study in chiaroscuro, where a single candle lights a face."),
    ("product listing", "This image showcases a sleek stainless steel water bottle with a bamboo lid.",
     "A sleek stainless steel water bottle with a bamboo lid."),
    ("case-insensitive", "THE IMAGE DEPICTS a crowded night market in Taipei, lanterns overhead.",
     "A crowded night market in Taipei, lanterns overhead."),
    ("whitespace only", "A red fox  sits\tin the snow.  \n\n\n\nIts breath fogs in the cold air.  ",
     "A red fox sits in the snow.\n\nIts breath fogs in the cold air."),
    ("whitespace, then the opening", "  This image  shows   a bowl of ramen with a soft-boiled egg.",
     "A bowl of ramen with a soft-boiled egg."),
    ("stable diffusion, a label", "Prompt: photo of a woman in a red coat, cinematic lighting, 85mm, bokeh",
     "photo of a woman in a red coat, cinematic lighting, 85mm, bokeh"),
]

# Text the rules must leave exactly as it is: already clean, or an opening whose removal would lose meaning.
UNCHANGED = [
    ("straightforward, already clean", "A ceramic mug of black coffee sits on a wooden table beside an open notebook."),
    ("stable diffusion", "masterpiece, best quality, 1girl, solo, long hair, looking at viewer, (cherry blossoms:1.2)"),
    ("midjourney, starts lower-case", "a lone astronaut on a red desert planet, two moons, cinematic --ar 16:9 --v 6"),
    ("fragment: a that-clause", "The image shows that the street has been recently flooded."),
    ("fragment: a how-clause", "This image shows how light filters through the stained glass of a chapel."),
    ("fragment: a phrasal verb", "The image shows off the intricate gears of an open pocket watch."),
    ("fragment: a negation", "This image depicts nothing but thick grey fog over a field."),
    ("one word would be left", "This image shows cats."),
    ("nothing would be left", "This image shows"),
    ("a relative clause follows", "In this image, which was taken in 1990, a man stands beside a Trabant."),
    ("the medium would be lost", "In this photograph, a woman reads on a park bench."),
    ("an interpretation, not a depiction", "The image evokes a sense of quiet melancholy and loss."),
    ("art critic, a clause after the subject", "This painting, with its bold brushwork, recalls the Fauvists."),
    ("art critic, an opinion", "This artwork exemplifies the drama of the Baroque period."),
    ("not an image noun", "This image is a bit blurry, but a cat is visible on the sofa."),
    ("social media", "This is what Sunday mornings are made for ☕️ #slowliving"),
    ("social media", "This is a mood. 🌧️📚"),
    ("social media", "We see you, Monday. ☕😴"),
    ("social media", "Golden hour never disappoints 🌅✨ #sunset #beachlife"),
    ("social media", "This view though 😍🏔️ #hiking"),
    ("social media", "In this house, we drink coffee first ☕"),
    ("social media, a reason is no picture", "This is a reason to print more photos, honestly. 📸"),
    ("product listing", "Handcrafted ceramic vase in matte sage green, 25 cm tall — perfect for dried flowers."),
    ("product listing, a heading is content", "Description: Soft organic cotton tee with a relaxed fit."),
    ("emoji with joiners", "Family day 👨‍👩‍👧‍👦 at the lake"),
]


@pytest.mark.parametrize("kind, raw, expected", CHANGED, ids=[f"{i}-{c[0]}" for i, c in enumerate(CHANGED)])
def test_meta_openings_and_whitespace_on_real_captions(kind: str, raw: str, expected: str):
    assert clean_caption(raw, PROSE) == expected


@pytest.mark.parametrize("kind, raw", UNCHANGED, ids=[f"{i}-{c[0]}" for i, c in enumerate(UNCHANGED)])
def test_what_must_not_change(kind: str, raw: str):
    assert clean_caption(raw, PROSE) == raw


def test_paragraphs_stay_and_each_rule_runs_alone():
    critic = "The image presents a quiet harbor at dusk.\n\nIts muted palette recalls Whistler's nocturnes."
    assert clean_caption(critic, PROSE) == ("A quiet harbor at dusk.\n\nIts muted palette recalls Whistler's "
                                            "nocturnes.")
    messy = "This image shows  a cat."
    assert clean_caption(messy, CleanupConfig(normalise_whitespace=True)) == "This image shows a cat."
    assert clean_caption(messy, CleanupConfig(strip_meta_openings=True)) == "A cat."
    assert clean_caption(messy, CleanupConfig()) == messy
    assert normalise_whitespace("a\u00a0\u00a0b \r\nc") == "a b\nc"


# (the model's tag list, the tag settings, the cleaned list)
TAGS = [
    ("1girl, Long_Hair, long hair, blue eyes", TagCleanup(style="spaces", lowercase=True, dedupe=True),
     "1girl, long hair, blue eyes"),
    ("1girl, Long_Hair, long hair, blue eyes", TagCleanup(dedupe=True), "1girl, Long_Hair, blue eyes"),
    ("artist:wlop, 1girl, solo, long hair, silver hair, looking_at_viewer, ^_^, outdoors",
     TagCleanup(style="underscores"),
     "artist:wlop, 1girl, solo, long_hair, silver_hair, looking_at_viewer, ^_^, outdoors"),
    ("artist: john doe, character:hatsune miku (vocaloid), Twintails", TagCleanup(style="underscores", lowercase=True),
     "artist:john_doe, character:hatsune_miku_(vocaloid), twintails"),
    ("hatsune_miku_(vocaloid), Twintails, aqua_hair, o_o, >_<, x_x", TagCleanup(style="spaces", lowercase=True),
     "hatsune miku (vocaloid), twintails, aqua hair, o_o, >_<, x_x"),
    ("species:canine, anthro, Fur, fur, blue_eyes, ,  smiling", TagCleanup(dedupe=True),
     "species:canine, anthro, Fur, blue_eyes, smiling"),
    ("cat, orange fur, sitting, windowsill, sunlight, cat, orange fur, sitting, windowsill, sunlight, cat",
     TagCleanup(dedupe=True), "cat, orange fur, sitting, windowsill, sunlight"),
    ("outdoors\nforest\n moss ,\ttree  stump", TagCleanup(), "outdoors, forest, moss, tree stump"),
    ("no_humans, scenery, mountain", TagCleanup(style="spaces", separator=","), "no humans,scenery,mountain"),
]


@pytest.mark.parametrize("raw, settings, expected", TAGS, ids=[f"tags-{i}" for i in range(len(TAGS))])
def test_tag_lists(raw: str, settings: TagCleanup, expected: str):
    assert clean_tags(raw, settings) == expected


def test_tag_lists_that_must_not_change_and_a_lead_in_before_tags():
    clean = "1girl, solo, smile, school uniform, cherry blossoms"
    assert clean_tags(clean, TagCleanup()) == clean
    assert clean_tags(clean, TagCleanup(style="spaces", lowercase=True, dedupe=True)) == clean
    settings = CleanupConfig(strip_meta_openings=True, tags=TagCleanup(style="underscores"))
    assert clean_caption("Here are the tags: 1girl, solo, school uniform", settings) == "1girl, solo, school_uniform"
    assert clean_caption("Tags: masterpiece, school uniform", settings) == "masterpiece, school_uniform"


def test_prepend_and_append_are_kept_out_of_the_clean_up():
    settings = CleanupConfig(strip_meta_openings=True)
    cleaned, raw = clean_column(["ohwx woman, This image shows a woman reading by a window. [end]", None],
                                "ohwx woman, ", " [end]", settings)
    assert cleaned == ["ohwx woman, A woman reading by a window. [end]", None]
    assert raw == ["This image shows a woman reading by a window.", None]
    tags = CleanupConfig(tags=TagCleanup(style="spaces", dedupe=True))
    assert clean_column(["masterpiece, long_hair, long hair"], "masterpiece, ", "", tags)[0] == [
        "masterpiece, long hair"]
    # Text the actor did not wrap (a caption written some other way) is cleaned whole, never wrapped twice.
    assert clean_column(["This image shows a woman reading."], "ohwx woman, ", " [end]", settings)[0] == [
        "A woman reading."]


# -- config ---------------------------------------------------------------------------------------------------

def _modes_with(cleanup: dict, mode: dict | None = None) -> dict:
    return base(modes=[{**(mode or {"name": "tags", "type": "booru_like", "length": 50}), "cleanup": cleanup}])


@pytest.mark.parametrize("tree, where, what", [
    (base(modes=[{"name": "d", "type": "straightforward", "cleanup": {"tags": {}}}]), "modes.0.cleanup",
     "`tags` is for tag caption types.*not straightforward"),
    (base(modes=[{"name": "sd", "type": "stable_diffusion", "cleanup": {"tags": {"dedupe": True}}}]),
     "modes.0.cleanup", "not stable_diffusion"),
    (base(modes=[{"name": "mix", "cleanup": {"tags": {}}, "prompts": [
        {"type": "booru_like"}, {"type": "descriptive"}, {"prompt": "List tags."}]}]), "modes.0.cleanup",
     "not descriptive"),
    (_modes_with({"strip_meta": True}), "modes.0.cleanup.strip_meta", "unknown key"),
    (_modes_with({"tags": {"style": "kebab"}}), "modes.0.cleanup.tags.style", "'spaces', 'underscores' or 'as_is'"),
    (_modes_with({"tags": {"separator": ""}}), "modes.0.cleanup.tags.separator", "at least 1 character"),
    (_modes_with({"tags": {"lowercase": "maybe"}}), "modes.0.cleanup.tags.lowercase", "valid boolean"),
])
def test_config_errors_name_the_key(tree: dict, where: str, what: str):
    with pytest.raises(ConfigError, match=rf"(?s){where}.*{what}"):
        build_config(tree)


def test_tag_options_are_accepted_on_tag_types_and_free_prompts():
    for mode in ({"name": "t", "type": "danbooru"}, {"name": "t", "type": "e621"}, {"name": "t", "type": "rule34"},
                 {"name": "t", "prompt": "List comma-separated tags for this image."},
                 {"name": "t", "prompts": [{"type": "booru_like"}, {"prompt": "Tags, please."}]}):
        config = build_config(_modes_with({"tags": {"style": "spaces"}}, mode))
        assert config.resolved_modes()[0].cleanup == CleanupConfig(tags=TagCleanup(style="spaces"))


def test_overrides_and_presets_reach_the_clean_up():
    config = build_config(base(), ["modes.0.cleanup.tags.style=underscores",
                                   "modes.1.cleanup.strip_meta_openings=true"])
    tags, description = config.resolved_modes()
    assert tags.cleanup == CleanupConfig(tags=TagCleanup(style="underscores"))
    assert description.cleanup == CleanupConfig(strip_meta_openings=True)
    dual = build_config(base(modes=[{"preset": "dual", "cleanup": {"normalise_whitespace": True}}]))
    assert [mode.cleanup for mode in dual.resolved_modes()] == [CleanupConfig(normalise_whitespace=True)] * 2
    assert all(mode.cleanup is None for mode in build_config(base()).resolved_modes())


# -- fingerprint ----------------------------------------------------------------------------------------------

# Computed with the code as it was before clean-up existed (input.uri=/data/samples, so no working directory
# enters it): outputs made then must resume now.
DEMO_FINGERPRINT = "c93caa2decde254b"
VARIED_FINGERPRINT = "96304620eb9b0e79"
VARIED_MODES = [{"name": "tags", "type": "danbooru", "prepend": "masterpiece, ", "append": " [end]"},
                {"name": "free", "prompt": "Describe it."},
                {"name": "mix", "prompts": [{"type": "descriptive", "weight": 2}, {"prompt": "Say hi"}]}]


def _demo(modes: object = None, overrides: tuple[str, ...] = ()) -> str:
    tree = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    if modes is not None:
        tree["modes"] = modes
    return build_config(tree, ["input.uri=/data/samples", *overrides]).fingerprint()


def test_fingerprint_without_clean_up_is_the_one_from_before():
    assert _demo() == DEMO_FINGERPRINT
    assert _demo(modes="dual") == DEMO_FINGERPRINT
    assert _demo(VARIED_MODES) == VARIED_FINGERPRINT
    all_off = {"strip_meta_openings": False, "normalise_whitespace": False}
    assert _demo(overrides=(f"modes.0.cleanup={json.dumps(all_off)}",)) == DEMO_FINGERPRINT


def test_fingerprint_follows_every_clean_up_setting():
    seen = {DEMO_FINGERPRINT}
    for change in ["modes.1.cleanup.strip_meta_openings=true", "modes.1.cleanup.normalise_whitespace=true",
                   "modes.0.cleanup.tags={}", "modes.0.cleanup.tags.style=spaces", "modes.0.cleanup.tags.dedupe=true",
                   "modes.0.cleanup.tags.separator=','"]:
        seen.add(_demo(overrides=(change,)))
    assert len(seen) == 7


def test_the_manifest_records_the_rules_only_when_on():
    config = build_config(base(), ["modes.0.cleanup.tags.style=spaces"])
    described = {mode["name"]: mode for mode in RunMetadata.of(config).modes}
    assert described["tags"]["cleanup"] == {"strip_meta_openings": False, "normalise_whitespace": False,
                                            "tags": {"style": "spaces", "lowercase": False, "dedupe": False,
                                                     "separator": ", "},
                                            "rules_version": RULES_VERSION}
    assert "cleanup" not in described["description"]


# -- the write stage, the committed table, exports and status -------------------------------------------------

def _captioned_batch(shard: str, config_modes: list[str]) -> object:
    keys = ["a.jpg", "b.jpg", "broken.jpg"]
    return to_table({
        "key": keys, "shard": [shard] * 3, "status": ["ok", "ok", "error"], "error": [None, None, "not an image"],
        "tags": ["1girl, Long_Hair, long hair", "cat,  cat , whiskers", None],
        "tags_prompt": ["Write a list of Booru-like tags for this image.", "same", None],
        "description": ["ohwx, This image shows a woman reading.", "ohwx, A cat on a rug.", None],
        "shard_size": [None, None, 3]}, in_flight_schema(config_modes))


def _cleaning_config(out: Path):
    return build_config(base(output={"uri": str(out)}, modes=[
        {"name": "tags", "type": "booru_like", "cleanup": {"tags": {"style": "spaces", "lowercase": True,
                                                                    "dedupe": True}}},
        {"name": "description", "type": "straightforward", "prepend": "ohwx, ",
         "cleanup": {"strip_meta_openings": True}},
        {"name": "plain", "type": "descriptive"}]))


def _commit(config, out: Path, shard: str) -> None:
    metadata = RunMetadata.of(config)
    Ledger(str(out)).write_manifest({**metadata.manifest(config), "created_at": time.time()})
    Ledger(str(out)).write_plan([])
    result = commit_shard(CommitRequest(shard, str(out), {}, [m.name for m in config.modes], metadata, False,
                                        time.time()))
    assert result.marker is not None, result.refused


def test_write_stage_cleans_and_keeps_the_raw_text(tmp_path: Path):
    config = _cleaning_config(tmp_path)
    write_expected(str(tmp_path), {}, "000000", ["a.jpg", "b.jpg", "broken.jpg"])
    batch = _captioned_batch("000000", ["tags", "description", "plain"])
    reports = write_stage(batch, str(tmp_path), {}, config.model_dump_json())
    assert reports.to_pylist() == [{"shard": "000000", "shard_size": 3, "keys": ["a.jpg", "b.jpg", "broken.jpg"]}]
    assert [WriteReport.from_row(row) for row in reports.to_pylist()] == [
        WriteReport("000000", 3, ["a.jpg", "b.jpg", "broken.jpg"])]
    _commit(config, tmp_path, "000000")
    table = pq.read_table(part_path(str(tmp_path), "000000"))
    assert table.schema.names == output_schema(["tags", "description", "plain"]).names
    rows = {row["key"]: row for row in table.to_pylist()}
    assert (rows["a.jpg"]["tags"], rows["a.jpg"]["tags_raw"]) == ("1girl, long hair", "1girl, Long_Hair, long hair")
    assert (rows["b.jpg"]["tags"], rows["b.jpg"]["tags_raw"]) == ("cat, whiskers", "cat,  cat , whiskers")
    assert rows["a.jpg"]["description"] == "ohwx, A woman reading."
    assert rows["a.jpg"]["description_raw"] == "This image shows a woman reading."
    assert rows["b.jpg"]["description_raw"] == "A cat on a rug."  # kept even when nothing changed
    assert all(row["plain_raw"] is None for row in rows.values())  # no clean-up, no raw column content
    assert rows["broken.jpg"]["tags"] is None and rows["broken.jpg"]["tags_raw"] is None
    stamped = json.loads(table.schema.metadata[b"joycaption_pipeline"])
    assert stamped["modes"][1]["cleanup"]["strip_meta_openings"] is True


def test_exports_and_status_do_not_take_raw_columns_for_modes(tmp_path: Path):
    out = tmp_path / "out"
    config = _cleaning_config(out)
    write_expected(str(out), {}, "000000", ["a.jpg", "b.jpg", "broken.jpg"])
    write_stage(_captioned_batch("000000", ["tags", "description", "plain"]), str(out), {}, config.model_dump_json())
    _commit(config, out, "000000")
    assert open_output(str(out)).mode_names == ["tags", "description", "plain"]
    assert list(status(str(out)).modes) == ["tags", "description", "plain"]
    export_txt(str(out), str(tmp_path / "txt"))
    assert (tmp_path / "txt" / "a.txt").read_text() == "1girl, long hair\nohwx, A woman reading.\n\n"
    assert export_jsonl(str(out), str(tmp_path / "rows.jsonl")) == 3
    first = json.loads((tmp_path / "rows.jsonl").read_text().splitlines()[0])
    assert first["tags_raw"] == "1girl, Long_Hair, long hair"


def test_write_stage_without_the_config_writes_what_the_actor_made(tmp_path: Path):
    batch = _captioned_batch("000001", ["tags", "description", "plain"])
    write_stage(batch, str(tmp_path), {})
    (fragment,) = Path(staging_dir(str(tmp_path), "000001")).glob("*.parquet")
    written = pq.read_table(fragment)
    assert written.column("tags").to_pylist() == batch.column("tags").to_pylist()
    assert written.column("tags_raw").null_count == 3


def test_a_part_file_from_before_the_raw_column_still_merges(tmp_path: Path):
    out, schema = str(tmp_path), output_schema(["tags"])
    old_schema = schema.remove(schema.get_field_index("tags_raw"))
    old = to_table({"key": ["a", "b"], "shard": ["000002"] * 2, "status": ["ok", "error"], "tags": ["old", None]},
                   old_schema)
    Path(part_path(out, "000002")).parent.mkdir()
    pq.write_table(old, part_path(out, "000002"))
    write_expected(out, {}, "000002", ["b"])
    redone = to_table({"key": ["b"], "shard": ["000002"], "status": ["ok"], "tags": ["new"], "tags_raw": ["New"]},
                      schema)
    Path(staging_dir(out, "000002")).mkdir(parents=True, exist_ok=True)
    pq.write_table(redone, staging_dir(out, "000002") + "/fragment.parquet")
    merged = merge_shard(out, {}, "000002", schema, {}, keep_committed=True)
    assert merged.select(["key", "tags", "tags_raw"]).to_pylist() == [
        {"key": "a", "tags": "old", "tags_raw": None}, {"key": "b", "tags": "new", "tags_raw": "New"}]
