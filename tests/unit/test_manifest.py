"""The manifest reader: good rows, each kind of bad row, CSV, streaming."""

from __future__ import annotations

import io
import json

import pytest

from pipeline.manifest import Row, manifest_json_schema
from pipeline.manifest_reader import read_manifest

# the single form's fields, not stored beside `adapters`
SINGLE_FORM = ("adapter", "scale", "combine", "s_scale", "region")


def rows_of(text: str, fmt: str = "jsonl") -> list:
    return list(read_manifest(io.BytesIO(text.encode()), fmt))  # type: ignore[arg-type]


def jsonl(*objs: object) -> str:
    return "\n".join(json.dumps(o) for o in objs) + "\n"


def test_defaults_of_a_minimal_row() -> None:
    [parsed] = rows_of(jsonl({"id": "a1", "reference": "s3://b/a.png"}))
    row = parsed.row
    assert parsed.error is None and row is not None
    assert (row.prompt, row.adapter, row.scale, row.num_images, row.steps) == (
        "",
        "sd15",
        0.5,
        1,
        30,
    )
    assert row.guidance_scale == 7.5 and row.output_format == "png"
    assert row.width is None and row.height is None
    assert row.adapter_specs()[0].references == ["s3://b/a.png"]


def test_seed_is_derived_from_the_id_when_absent_and_stable() -> None:
    a = Row(id="sku-1", reference="x.png")
    b = Row(id="sku-2", reference="x.png")
    assert a.effective_seed() == Row(id="sku-1", reference="y.png").effective_seed()
    assert a.effective_seed() != b.effective_seed()
    assert 0 <= a.effective_seed() < 2**32
    assert Row(id="sku-1", reference="x.png", seed=7).effective_seed() == 7


def test_adapters_list_and_instantstyle_scale() -> None:
    [parsed] = rows_of(
        jsonl(
            {
                "id": "multi",
                "adapters": [
                    {
                        "adapter": "sd15-plus",
                        "reference": ["a.png", "b.png"],
                        "combine": "concat",
                        "scale": {
                            "down": {"block_2": [0.0, 1.0]},
                            "up": {"block_1": [0.0, 1.0, 0.0]},
                        },
                    },
                    {"adapter": "sd15", "reference": "c.png", "scale": 0.3},
                ],
            }
        )
    )
    assert parsed.error is None, parsed.error
    specs = parsed.row.adapter_specs()
    assert [s.adapter for s in specs] == ["sd15-plus", "sd15"]
    assert specs[0].references == ["a.png", "b.png"] and specs[0].combine == "concat"


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        ({"id": "a", "reference": "r.png", "colour": "red"}, "colour: unknown field"),
        ({"id": "a"}, "'reference' is required"),
        ({"id": "a/b", "reference": "r.png"}, "id:"),
        ({"id": "../x", "reference": "r.png"}, "id:"),
        ({"id": "a\u0007", "reference": "r.png"}, "id:"),
        ({"id": "a", "reference": "r.png", "num_images": 17}, "num_images"),
        ({"id": "a", "reference": "r.png", "steps": 0}, "steps"),
        ({"id": "a", "reference": "r.png", "seed": 2**32}, "seed"),
        ({"id": "a", "reference": "r.png", "width": 100}, "width"),
        ({"id": "a", "reference": "r.png", "height": 4096}, "height"),
        ({"id": "a", "reference": "r.png", "guidance_scale": 31}, "guidance_scale"),
        ({"id": "a", "reference": "r.png", "scale": 2.5}, "scale"),
        ({"id": "a", "reference": "r.png", "adapter": "nope"}, "unknown adapter 'nope'"),
        ({"id": "a", "reference": "r.png", "output_format": "gif"}, "output_format"),
        ({"id": "a", "reference": []}, "reference"),
        ({"id": "a", "reference": "r.png", "steps": "many"}, "steps"),
        ({"id": "a", "reference": "r.png", "scale": {"down": {"blockX": 1.0}}}, "block names"),
        ({"id": "a", "reference": "r.png", "scale": {"up": -3.0}}, "scale.up: a scale must be"),
        ({"id": "a", "reference": "r.png", "scale": {"mid": 7.0}}, "scale.mid: a scale must be"),
        (
            {"id": "a", "reference": "r.png", "s_scale": 1.0},
            "s_scale applies to sd15-faceid-plusv2, sdxl-faceid-plusv2 only, not sd15",
        ),
        (
            {"id": "a", "reference": "r.png", "adapter": "sd15-faceid-plusv2", "s_scale": 6},
            "s_scale",
        ),
        (
            {
                "id": "a",
                "adapters": [
                    {"adapter": "sd15-faceid", "reference": "a.png"},
                    {"adapter": "sd15-faceid-plusv2", "reference": "b.png"},
                ],
            },
            "at most one FaceID adapter per row",
        ),
        ({"id": "a", "reference": "r.png", "adapters": [{"reference": "b.png"}]}, "not both"),
        ({"id": 12, "reference": "r.png"}, "id:"),
        # structure inputs
        ({"id": "a", "reference": "r.png", "control": [{"image": "c.png"}]}, "control.0.model"),
        (
            {"id": "a", "reference": "r.png", "control": [{"model": "sd15-hed", "image": "c.png"}]},
            "unknown ControlNet 'sd15-hed'",
        ),
        (
            {
                "id": "a",
                "reference": "r.png",
                "control": [{"model": "sd15-canny", "image": "c"}] * 4,
            },
            "control",
        ),
        (
            {
                "id": "a",
                "reference": "r.png",
                "control": [{"model": "sd15-canny", "image": "c.png", "scale": 2.5}],
            },
            "control.0.scale",
        ),
        (
            {
                "id": "a",
                "reference": "r.png",
                "control": [{"model": "sd15-canny", "image": "c.png", "end": 1.5}],
            },
            "control.0.end",
        ),
        (
            {
                "id": "a",
                "reference": "r.png",
                "control": [
                    {
                        "model": "sd15-canny",
                        "image": "c.png",
                        "preprocess": "canny",
                        "low": 200,
                        "high": 100,
                    }
                ],
            },
            "low (200) must be below high (100)",
        ),
        (
            {
                "id": "a",
                "reference": "r.png",
                "control": [{"model": "sd15-depth", "image": "d.png", "low": 5}],
            },
            "canny thresholds",
        ),
        (
            {
                "id": "a",
                "reference": "r.png",
                "control": [{"model": "sd15-canny", "image": "c.png", "preprocess": "hed"}],
            },
            "control.0.preprocess",
        ),
        ({"id": "a", "reference": "r.png", "strength": 0.5}, "strength needs init_image"),
        (
            {"id": "a", "reference": "r.png", "inpaint_mask": "alpha"},
            "inpaint_mask needs init_image",
        ),
        ({"id": "a", "reference": "r.png", "init_image": "i.png", "strength": -0.1}, "strength"),
        (
            {"id": "a", "reference": ["r.png", "s.png"], "region": ["m.png", "n.png"]},
            "combine 'average' makes the references one embedding",
        ),
        (
            {"id": "a", "adapters": [{"reference": "r.png"}], "region": "m.png"},
            "not both",
        ),
    ],
)
def test_each_bad_row_fails_alone_with_the_field_named(obj: dict, needle: str) -> None:
    good = {"id": "good", "reference": "r.png"}
    parsed = rows_of(jsonl(good, obj, {"id": "good2", "reference": "r.png"}))
    assert [p.row is not None for p in parsed] == [True, False, True]
    assert parsed[1].error is not None and needle in parsed[1].error, parsed[1].error
    assert parsed[1].error.startswith("line 2:")


def test_malformed_lines_duplicates_and_blank_lines() -> None:
    text = (
        '{"id": "a", "reference": "r.png"}\n'
        "\n"
        "{not json\n"
        "[1, 2]\n"
        '{"id": "a", "reference": "other.png"}\n'
        "   \n"
        '{"id": "b", "reference": "r.png"}'  # no trailing newline
    )
    parsed = rows_of(text)
    assert [p.index for p in parsed] == [0, 1, 2, 3, 4]
    assert [p.line_number for p in parsed] == [1, 3, 4, 5, 7]
    assert parsed[1].error and "not valid JSON" in parsed[1].error
    assert parsed[2].error and "JSON object" in parsed[2].error
    assert parsed[3].error and "used by an earlier row" in parsed[3].error
    assert parsed[3].row_id == "a"
    assert parsed[4].row is not None and parsed[4].row.id == "b"


def test_invalid_utf8_line_fails_alone() -> None:
    data = b'{"id": "a", "reference": "r.png"}\n{"id": "\xff"}\n{"id": "b", "reference": "r"}\n'
    parsed = list(read_manifest(io.BytesIO(data)))
    assert [p.row is not None for p in parsed] == [True, False, True]
    assert "UTF-8" in (parsed[1].error or "")


def test_csv_with_the_same_columns() -> None:
    text = (
        "id,prompt,reference,num_images,scale,adapter\n"
        'a,"a shoe, red",s3://b/a.png,2,0.7,sd15-plus\n'
        'b,,"[""s3://b/1.png"", ""s3://b/2.png""]",,"{""down"": {""block_2"": 1.0}}",\n'
        "c,x,s3://b/c.png,many,,\n"
    )
    parsed = rows_of(text, "csv")
    assert parsed[0].row is not None
    assert parsed[0].row.num_images == 2 and parsed[0].row.adapter == "sd15-plus"
    assert parsed[0].row.prompt == "a shoe, red"
    assert parsed[1].row is not None, parsed[1].error
    assert parsed[1].row.adapter_specs()[0].references == ["s3://b/1.png", "s3://b/2.png"]
    assert parsed[1].row.scale == {"down": {"block_2": 1.0}}
    assert parsed[2].row is None and "num_images" in (parsed[2].error or "")


def test_reader_is_lazy() -> None:
    """A generator over the stream: the first row comes before the rest is read."""

    class Endless(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buffer):  # type: ignore[no-untyped-def]
            line = b'{"id": "x%d", "reference": "r.png"}\n'
            data = (line * (len(buffer) // len(line) + 1))[: len(buffer)]
            buffer[: len(data)] = data
            return len(data)

    reader = read_manifest(io.BufferedReader(Endless()))
    first = next(reader)
    assert first.index == 0


def test_json_schema_describes_every_field() -> None:
    schema = manifest_json_schema()
    assert set(schema["properties"]) >= {
        "id",
        "prompt",
        "negative_prompt",
        "reference",
        "adapter",
        "scale",
        "adapters",
        "num_images",
        "seed",
        "steps",
        "guidance_scale",
        "width",
        "height",
        "output_format",
        "combine",
    }
    assert schema["additionalProperties"] is False
    assert "id" in schema["required"]


@pytest.mark.parametrize(
    ("adapter", "scale", "needle"),
    [
        ("sd15", {"up": {"block_0": [0.0, 1.0, 0.0]}}, "up blocks block_1, block_2, block_3 only"),
        ("sd15-plus", {"down": {"block_3": 1.0}}, "down blocks block_0, block_1, block_2 only"),
        ("sd15", {"down": {"block_2": [1.0]}}, "needs 2 values"),
        ("sdxl", {"down": {"block_0": 1.0}}, "down blocks block_1, block_2 only"),
        ("sdxl", {"mid": {"block_0": 1.0}}, "scale.mid takes one number"),
    ],
)
def test_instantstyle_blocks_are_checked_against_the_base_model(
    adapter: str, scale: dict, needle: str
) -> None:
    [parsed] = rows_of(jsonl({"id": "a", "reference": "r.png", "adapter": adapter, "scale": scale}))
    assert parsed.row is None and needle in (parsed.error or ""), parsed.error


def test_s_scale_is_the_cards_default_or_the_rows() -> None:
    """FaceID-Plus v2's structure weight: the model card's s_scale (1.0), or the row's."""
    v2 = {"id": "a", "reference": "r.png", "adapter": "sd15-faceid-plusv2"}
    [default, tuned] = rows_of(jsonl(v2, {**v2, "id": "b", "s_scale": 1.8}))
    assert default.row is not None and tuned.row is not None
    assert default.row.adapter_specs()[0].shortcut_scale == 1.0
    assert tuned.row.adapter_specs()[0].shortcut_scale == 1.8
    assert Row.model_validate(tuned.row.to_params()).adapter_specs()[0].shortcut_scale == 1.8
    listed = {"id": "c", "adapters": [{**v2, "s_scale": 0.5}]}
    listed["adapters"][0].pop("id")
    [parsed] = rows_of(jsonl(listed))
    assert parsed.row is not None and parsed.row.adapter_specs()[0].shortcut_scale == 0.5


def test_instantstyle_blocks_that_exist_are_accepted() -> None:
    ok = [
        ("sd15", {"down": {"block_2": [0.0, 1.0]}, "mid": 0.5, "up": {"block_1": 1.0}}),
        ("sdxl", {"up": {"block_0": [0.0, 1.0, 0.0]}, "down": 0.0}),
    ]
    for adapter, scale in ok:
        [parsed] = rows_of(jsonl({"id": "a", "reference": "r", "adapter": adapter, "scale": scale}))
        assert parsed.error is None, parsed.error


def test_adapters_of_one_row_share_a_base_and_faceid_plus_takes_one_face() -> None:
    mixed = {
        "id": "m",
        "adapters": [{"adapter": "sd15", "reference": "a"}, {"adapter": "sdxl", "reference": "b"}],
    }
    faces = {
        "id": "f",
        "adapter": "sd15-faceid-plusv2",
        "reference": ["a", "b"],
        "combine": "concat",
    }
    averaged = {**faces, "id": "g", "combine": "average"}
    parsed = rows_of(jsonl(mixed, faces, averaged))
    assert "share one base model" in (parsed[0].error or "")
    assert "takes one face" in (parsed[1].error or "")
    assert parsed[2].row is not None


def test_every_contract_preset_is_accepted() -> None:
    names = [
        "sd15",
        "sd15-plus",
        "sd15-plus-face",
        "sd15-full-face",
        "sd15-faceid",
        "sd15-faceid-plusv2",
        "sdxl",
        "sdxl-plus",
        "sdxl-plus-face",
        "sdxl-faceid",
        "sdxl-faceid-plusv2",
    ]
    parsed = rows_of(jsonl(*({"id": n, "adapter": n, "reference": "r"} for n in names)))
    assert [p.error for p in parsed] == [None] * len(names)


def test_params_round_trip_to_the_same_row() -> None:
    rows = [
        Row(id="a", reference="r.png", num_images=2),
        Row.model_validate({"id": "b", "adapters": [{"adapter": "sd15", "reference": "x"}]}),
        Row.model_validate(
            {
                "id": "c",
                "prompt": 'café \u2014 "quoted"\n',
                "reference": ["x", "y"],
                "combine": "concat",
                "region": ["m1", "m2"],
                "scale": {"up": {"block_1": [0.0, 1.0, 0.0]}},
                "seed": 0,
                "control": [{"model": "sd15-canny", "image": "c.png", "end": 0.25}],
                "guidance_scale": 1e-3,
            }
        ),
    ]
    for row in rows:
        params = row.to_params()
        assert Row.model_validate(params) == row.model_copy(update={"seed": row.effective_seed()})
        assert params["seed"] == row.effective_seed() and params["steps"] == 30
        # the ledger's text (written by pydantic's serializer) is pydantic's JSON-mode dump
        # with the derived seed, and none of the single form's keys beside `adapters`
        expected = row.model_dump(mode="json", exclude_none=True) | {"seed": row.effective_seed()}
        if row.adapters is not None:
            expected = {k: v for k, v in expected.items() if k not in SINGLE_FORM}
        assert json.loads(row.params_json()) == expected
