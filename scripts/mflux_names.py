"""Record mflux's own names for the tiny image fixtures: tests/fixtures/mflux/<fixture>.json.

mflux-save writes each tensor under mflux's module path, not diffusers' name, and saves conv weights in
MLX's layout. mflux cannot build a tiny model (its networks have the released sizes built in), so
tests/mflux_writer.py writes mflux's layout from the tiny diffusers fixtures with the names this script
takes from mflux's own weight-mapping tables: for each component, diffusers name -> [mflux name, the
transform mflux applies on load (None, or the WeightTransforms method's name)].

Run in a side venv that has mlx and mflux (``pip install "mlx[cpu]==0.32.4" && pip install --no-deps
mflux==0.24.0``): ``python scripts/mflux_names.py``. Only the mapping modules are imported (mflux's
package __init__ files pull in transformers and the whole model zoo), and no torch is needed.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
MAPPINGS = {  # fixture -> (mapping module, class)
    "zimage-tiny": ("mflux.models.z_image.weights.z_image_weight_mapping", "ZImageWeightMapping"),
    "flux2-klein-tiny": ("mflux.models.flux2.weights.flux2_weight_mapping", "Flux2WeightMapping"),
}
COMPONENTS = {"transformer": "get_transformer_mapping", "text_encoder": "get_text_encoder_mapping",
              "vae": "get_vae_mapping"}
BARE_PACKAGES = ("mflux", "mflux.models", "mflux.models.common", "mflux.models.common.weights",
                 "mflux.models.common.weights.mapping", "mflux.models.z_image", "mflux.models.z_image.weights",
                 "mflux.models.flux2", "mflux.models.flux2.weights")
PLACEHOLDER = re.compile(r"\{(\w+)\}")


def register_bare_packages() -> None:
    """mflux's packages down to the mapping modules, as bare namespaces: their __init__ files do not run."""
    base = Path(importlib.util.find_spec("mflux").origin).parent
    for name in BARE_PACKAGES:
        package = types.ModuleType(name)
        package.__path__ = [str(base.joinpath(*name.split(".")[1:]))]
        sys.modules[name] = package


def pattern_regex(pattern: str) -> re.Pattern:
    """mflux's "{layer}"-style placeholders -> a regex with one named group each."""
    out, last = "", 0
    for match in PLACEHOLDER.finditer(pattern):
        out += re.escape(pattern[last:match.start()]) + f"(?P<{match.group(1)}>\\d+)"
        last = match.end()
    return re.compile(out + re.escape(pattern[last:]) + "$")


def mflux_name(diffusers_name: str, targets: list) -> tuple[str, str | None] | None:
    for target in targets:
        for source in target.from_pattern:
            match = pattern_regex(source).match(diffusers_name)
            if match:
                name = target.to_pattern.format(**match.groupdict())
                return name, target.transform.__name__ if target.transform else None
    return None


def names_for(fixture: str) -> dict:
    module, cls = MAPPINGS[fixture]
    mapping = getattr(importlib.import_module(module), cls)
    out = {"mflux_version": importlib.metadata.version("mflux")}
    for component, getter in COMPONENTS.items():
        targets = getattr(mapping, getter)()
        tensors = {}
        for path in sorted((FIXTURES / fixture / component).glob("*.safetensors")):
            tensors |= mx.load(str(path))
        names = {}
        for name in sorted(tensors):
            mapped = mflux_name(name, targets)
            if mapped is None:
                print(f"{fixture}/{component}: {name} has no mflux target; mflux does not load it", file=sys.stderr)
                continue
            names[name] = list(mapped)
        out[component] = names
    return out


def main() -> None:
    register_bare_packages()
    folder = FIXTURES / "mflux"
    folder.mkdir(exist_ok=True)
    for fixture in MAPPINGS:
        (folder / f"{fixture}.json").write_text(json.dumps(names_for(fixture), indent=0) + "\n")
        print(f"wrote {folder / fixture}.json")


if __name__ == "__main__":
    main()
