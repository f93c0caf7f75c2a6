"""deploy/Dockerfile as dockerfile-parse reads it: its build stages and their instructions,
the environment and user the final image runs with, its base images and whether they are
pinned. Used by the image's own checks and by those of compose and Kubernetes."""

from __future__ import annotations

import io
import json
import re
from typing import Any

from dockerfile_parse import DockerfileParser

from tests.deploy.deploykit import DEPLOY

DOCKERFILE = DEPLOY / "Dockerfile"


def parsed(text: str | None = None) -> DockerfileParser:
    data = DOCKERFILE.read_bytes() if text is None else text.encode()
    return DockerfileParser(fileobj=io.BytesIO(data))


def build_stages(parser: DockerfileParser) -> list[list[dict[str, Any]]]:
    """Instructions per build stage (the first list holds what precedes the first FROM)."""
    stages: list[list[dict[str, Any]]] = [[]]
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            stages.append([])
        stages[-1].append(instruction)
    return stages


def final_stage(parser: DockerfileParser) -> list[dict[str, Any]]:
    return build_stages(parser)[-1]


def values_of(stage: list[dict[str, Any]], name: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == name]


def exec_form(value: str) -> list[str]:
    form = json.loads(value)
    assert isinstance(form, list) and all(isinstance(v, str) for v in form), value
    return form


def image_environment() -> dict[str, str]:
    """The RELAY_* environment the final image runs with."""
    return {k: v for k, v in parsed().envs.items() if k.startswith("RELAY_")}


def image_user() -> str:
    return values_of(final_stage(parsed()), "USER")[-1]


def base_images(parser: DockerfileParser) -> list[str]:
    """The base image of each stage with ARG defaults substituted; stage names left out."""
    args: dict[str, str] = {}
    for instruction in build_stages(parser)[0]:
        if instruction["instruction"] == "ARG" and "=" in instruction["value"]:
            key, _, value = instruction["value"].partition("=")
            args[key.strip()] = value.strip()
    names: set[str] = set()
    images = []
    for stage in build_stages(parser)[1:]:
        words = stage[0]["value"].split()
        words = [w for w in words if not w.startswith("--platform")]
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], words[0])
        if len(words) == 3 and words[1].upper() == "AS":
            names.add(words[2])
        if image not in names:
            images.append(image)
    return images


def pinned_image_problems(images: list[str]) -> list[str]:
    """Images without a tag (or digest), or tagged `latest`."""
    problems = []
    for image in images:
        if "@sha256:" in image:
            continue
        # The tag follows the last ":" of the last path part (a registry may have a port).
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        if not tag:
            problems.append(f"{image}: no tag")
        elif tag == "latest":
            problems.append(f"{image}: the latest tag")
    return problems
