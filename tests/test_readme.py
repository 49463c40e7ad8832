"""Every ```python block of README.md runs as written, each in a fresh namespace in an empty working directory."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.DOTALL | re.MULTILINE)


def test_readme_has_python_blocks():
    assert len(BLOCKS) > 0, f"no ```python block found in {README}"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = compile(BLOCKS[index], f"README.md python block {index}", "exec")
    try:
        exec(code, {"__name__": f"readme_block_{index}"})
    except Exception as e:
        pytest.fail(f"README.md python block {index} failed: {type(e).__name__}: {e}\n{BLOCKS[index]}")
