import torch

from clrface.train.cache import cached, folder_stamp


def test_a_cache_is_reused_only_while_its_key_holds(tmp_path):
    path, made, lines = tmp_path / "run" / "latents.pt", [], []

    def make(value):
        def f():
            made.append(value)
            return torch.full((2,), float(value))
        return f

    key = {"train_dir": ["faces/a"], "faces": 16}
    assert cached(path, key, make(1), log=lines.append).tolist() == [1.0, 1.0]
    assert cached(path, dict(key), make(2), log=lines.append).tolist() == [1.0, 1.0]  # reused
    assert cached(path, {**key, "faces": 8}, make(3), log=lines.append).tolist() == [3.0, 3.0]  # other data
    assert made == [1, 3] and len(lines) == 1 and "making it again" in lines[0]
    torch.save(torch.zeros(2), path)  # a cache written without a key (an older version's file)
    assert cached(path, key, make(4), log=lines.append).tolist() == [4.0, 4.0]
    path.write_bytes(b"damaged")
    assert cached(path, key, make(5), log=lines.append).tolist() == [5.0, 5.0]
    assert made == [1, 3, 4, 5] and not list(path.parent.glob(".*tmp*"))


def test_folder_stamp_changes_when_weights_are_rewritten(tmp_path):
    (tmp_path / "prior").mkdir()
    (tmp_path / "prior" / "model.safetensors").write_bytes(b"a")
    before = folder_stamp(tmp_path)
    assert before[0] == str(tmp_path.resolve()) and before[1][:2] == ["prior/model.safetensors", 1]
    (tmp_path / "prior" / "model.safetensors").write_bytes(b"ab")
    assert folder_stamp(tmp_path) != before
