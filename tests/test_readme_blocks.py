"""How the README-execution harness reads the README: directives, background servers, refusals."""

from __future__ import annotations

import pytest

from readme_blocks import ReadmeDirectiveError, read_blocks, split_background

README = """# Title
## Start

```yaml
# not a heading
```

```bash
echo one
```

<!-- readme-test: skip needs a GPU -->
```bash
nvidia-smi
```

## Serve it
<!-- readme-test: background http://127.0.0.1:8000/ready -->
<!-- readme-test: replace "--epochs 30" "--max-steps 5" -->
<!-- readme-test: env A=1 -->
```bash
# a comment
serve x \\
   --epochs 30
curl y
```
"""


def test_blocks_directives_and_sections(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(README)
    first, skipped, served = read_blocks(path)
    assert (first.name, first.script, first.skip) == ("01-start", "echo one", None)
    assert skipped.skip == "needs a GPU"
    assert served.name == "03-serve-it" and served.env == {"A": "1"}
    assert served.background_url == "http://127.0.0.1:8000/ready"
    assert "--max-steps 5" in served.runnable_script() and "--epochs 30" not in served.runnable_script()
    assert split_background(served.runnable_script()) == ("serve x \\\n   --max-steps 5", "curl y")


@pytest.mark.parametrize("directive, message", [
    ("<!-- readme-test: frobnicate -->\n```bash\nx\n```\n", "not understood"),
    ("<!-- readme-test: skip gpu -->\ntext\n```bash\nx\n```\n", "right before"),
])
def test_bad_directives_are_named(tmp_path, directive, message):
    path = tmp_path / "README.md"
    path.write_text(directive)
    with pytest.raises(ReadmeDirectiveError, match=message):
        read_blocks(path)


def test_a_replacement_that_no_longer_matches_fails(tmp_path):
    path = tmp_path / "README.md"
    path.write_text('<!-- readme-test: replace "--epochs 30" "--max-steps 1" -->\n```bash\ntrain --epochs 30x\n```\n')
    (block,) = read_blocks(path)
    assert block.runnable_script() == "train --max-steps 1x"
    path.write_text('<!-- readme-test: replace "--epochs 9" "--max-steps 1" -->\n```bash\ntrain\n```\n')
    with pytest.raises(ReadmeDirectiveError, match="not in the block"):
        read_blocks(path)[0].runnable_script()
