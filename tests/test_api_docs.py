"""docs/api.md lists every public name of ivg_kernels and ivg, with every parameter of each callable;
no page of the README or docs refers to a file outside the repository."""
import inspect
import re
from pathlib import Path

import pytest

import ivg
import ivg_kernels

ROOT = Path(__file__).resolve().parent.parent
API = (ROOT / "docs" / "api.md").read_text()


def _sections():
    """`### `name`` heading -> the text up to the next heading."""
    parts = re.split(r"^### `([^`]+)`\s*$", API, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


PUBLIC = [(m, n) for m in (ivg_kernels, ivg) for n in m.__all__ if n != "__version__"]


@pytest.mark.parametrize("module,name", PUBLIC, ids=[f"{m.__name__}.{n}" for m, n in PUBLIC])
def test_every_public_name_has_an_entry_with_its_parameters(module, name):
    sections = _sections()
    assert name in sections, f"docs/api.md has no '### `{name}`' entry"
    obj = getattr(module, name)
    if not callable(obj) or (inspect.isclass(obj) and issubclass(obj, BaseException)):
        return
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return
    signature_line = sections[name].strip().splitlines()[0]
    for p in params.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        assert re.search(rf"\b{p.name}\b", signature_line), f"{name}: parameter {p.name!r} not in {signature_line!r}"


def test_no_entry_without_a_public_name():
    public = {n for _, n in PUBLIC}
    assert set(_sections()) <= public, set(_sections()) - public


def test_docs_and_readme_refer_to_no_file_outside_the_repository():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        text = page.read_text()
        assert "../shared" not in text and "shared/IVG.md" not in text, page
        assert not re.search(r"https?://", text), f"{page.name}: points outside the repository"
        for target in re.findall(r"\]\(([^)#]+)", text):  # relative markdown links must resolve
            assert (page.parent / target).exists(), f"{page.name}: link to {target} leads nowhere"
