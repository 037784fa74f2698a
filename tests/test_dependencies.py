"""Only documented interfaces of our dependencies, and the few internals we cannot avoid each in one place.

accelerate 1.16 removed ``accelerate.utils.constants.FSDP2_PYTORCH_VERSION``, which ``review_lm/training/sharding.py``
imported: every ``--fsdp`` run and a fresh clone's ``make test`` broke on a release none of our code changed.
This file reads the code (no imports of it) and fails if any module of the package, a top-level script or a
tool imports a private or undocumented name of torch / transformers / accelerate / peft / trl / datasets, or
reaches a ``_private`` attribute, outside the one owner listed in :data:`INTERNALS`. Each owner's use is then
checked against the installed library by a test whose failure names the library version.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEPENDENCIES = ("torch", "transformers", "accelerate", "peft", "trl", "datasets")
# Submodules whose names are documented as import paths. torch's public submodules are many and all
# un-underscored (torch.nn.functional, torch.distributed, torch.utils.data): any of those is fine.
DOCUMENTED_MODULES = {
    "transformers", "transformers.utils.logging", "accelerate", "accelerate.utils", "peft", "trl", "datasets",
}
# Private names of the standard library that are documented (os._exit is the documented no-cleanup exit).
STDLIB_PRIVATE = {"_exit"}

# The internals no documented interface replaces: name -> (the one file that may use it, why).
INTERNALS = {
    "transformers.trainer_pt_utils": (
        "review_lm/training/samplers.py",
        "LengthGroupedSampler (Trainer's own length grouping) is not exported from transformers' top level"),
    "_get_train_sampler": (
        "review_lm/training/samplers.py",
        "Trainer has no public hook to give group_by_length the lengths a lazy dataset already knows"),
    "_get_eval_sampler": ("review_lm/training/samplers.py", "as _get_train_sampler, for evaluation"),
    "_no_split_modules": (
        "review_lm/training/adapters.py",
        "the class attribute naming a model's decoder block; transformers has no public accessor for it"),
}


def source_files() -> list[Path]:
    files = sorted(REPO.glob("*.py")) + sorted((REPO / "review_lm").rglob("*.py")) + sorted(REPO.glob("tools/*.py"))
    assert len(files) > 20
    return files


def dependency_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) for every import of a dependency module or name that is not plainly public, and every
    ``x._private`` attribute (``self``/``cls`` excepted) or ``getattr(x, "_private")``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules, names = [node.module], [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            modules, names = [a.name for a in node.names], []
        else:
            modules, names = [], []
        for module in modules:
            root = module.split(".")[0]
            if root not in DEPENDENCIES:
                continue
            private_part = any(part.startswith("_") for part in module.split("."))
            undocumented = root != "torch" and module not in DOCUMENTED_MODULES
            if private_part or undocumented:
                found.append((node.lineno, module))
            found += [(node.lineno, name) for name in names if name.startswith("_")]
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")) and node.attr not in STDLIB_PRIVATE:
                found.append((node.lineno, node.attr))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                and str(node.args[1].value).startswith("_") and not str(node.args[1].value).startswith("__")):
            found.append((node.lineno, node.args[1].value))
    return found


def test_no_module_uses_a_private_or_undocumented_dependency_name_outside_its_one_owner():
    problems = []
    for path in source_files():
        rel = path.relative_to(REPO).as_posix()
        for line, name in dependency_uses(ast.parse(path.read_text(encoding="utf-8"))):
            owner = INTERNALS.get(name)
            if owner is None:
                problems.append(f"{rel}:{line}: {name} is private or undocumented; use a documented API, or "
                                "isolate it in one owner listed in INTERNALS with a version-naming test")
            elif owner[0] != rel:
                problems.append(f"{rel}:{line}: {name} is owned by {owner[0]}; go through it")
    assert not problems, "\n".join(problems)


def test_the_scan_finds_what_it_is_for():
    """The scanner itself: the import that broke accelerate 1.16, a private attribute, a private getattr."""
    code = ("from accelerate.utils.constants import FSDP2_PYTORCH_VERSION\nimport torch._dynamo\n"
            "from transformers.modeling_utils import slice_logits_to_keep\nn = model._no_split_modules\n"
            "g = getattr(model, '_hidden')\nself._mine = 1\nos._exit(0)\nfrom transformers import Trainer\n")
    names = sorted(name for _, name in dependency_uses(ast.parse(code)))
    assert names == sorted(["accelerate.utils.constants", "torch._dynamo", "transformers.modeling_utils",
                            "_no_split_modules", "_hidden"])


def test_every_owner_still_uses_its_internal():
    """An entry whose owner no longer uses the name is stale: the list says only what is true."""
    for name, (owner, _) in INTERNALS.items():
        uses = {n for _, n in dependency_uses(ast.parse((REPO / owner).read_text(encoding="utf-8")))}
        assert name in uses, f"INTERNALS lists {name} for {owner}, which no longer uses it"


# ----------------------------------------------------------------------------------------------------------------
# The internals, checked against the installed versions: a release that changes one fails here, naming itself.
# ----------------------------------------------------------------------------------------------------------------
def test_trainer_sampler_internals_exist_in_this_transformers():
    import transformers
    from transformers import Trainer

    version = f"transformers {transformers.__version__}"
    try:
        from transformers.trainer_pt_utils import LengthGroupedSampler
    except ImportError as err:  # pragma: no cover - only on a breaking release
        pytest.fail(f"{version} no longer has trainer_pt_utils.LengthGroupedSampler ({err}); "
                    "update review_lm/training/samplers.py")
    assert "lengths" in inspect.signature(LengthGroupedSampler).parameters, \
        f"{version}: LengthGroupedSampler no longer takes lengths=; update review_lm/training/samplers.py"
    for method, argument in (("_get_train_sampler", "train_dataset"), ("_get_eval_sampler", "eval_dataset")):
        assert hasattr(Trainer, method), f"{version}: Trainer.{method} is gone; update review_lm/training/samplers.py"
        assert argument in inspect.signature(getattr(Trainer, method)).parameters, \
            f"{version}: Trainer.{method} no longer takes {argument}; update review_lm/training/samplers.py"


def test_decoder_block_attribute_exists_in_this_transformers(tiny_model):
    import transformers
    from transformers import AutoModelForCausalLM

    from review_lm.training.adapters import decoder_layer_classes

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert decoder_layer_classes(model) == {"Qwen2DecoderLayer"}, (
        f"transformers {transformers.__version__}: _no_split_modules no longer names the decoder block; "
        "update review_lm/training/adapters.py decoder_layer_classes")
