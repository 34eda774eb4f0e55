import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from segmenters.data import DatasetError, build_dataset
from segmenters.data.real import CITYSCAPES_CLASSES, CamVid, Cityscapes, VOCSegmentation
from segmenters.data.transforms import train_augmentation

pytestmark = pytest.mark.data


def test_camvid_splits_classes_and_void(data_root):
    train = CamVid(data_root / "camvid", "train")
    val = CamVid(data_root / "camvid", "val")
    assert (len(train), len(val)) == (367, 101)
    image, label = val[0]
    assert image.shape == (3, 360, 480) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    values = set(torch.unique(label).tolist())
    assert values <= set(range(11)) | {255}
    raw = np.asarray(Image.open(val.pairs[0][1]))
    # void (11) becomes the ignore index, every other id is kept as is
    assert ((raw == 11) == (label.numpy() == 255)).all()
    assert (raw[raw != 11] == label.numpy()[raw != 11]).all()


def test_cityscapes_label_ids_map_to_the_official_train_ids(data_root):
    from cityscapesscripts.helpers.labels import id2label

    root = data_root / "fixtures" / "cityscapes"
    ds = Cityscapes(root, "val")
    assert len(ds) == 1 and len(CITYSCAPES_CLASSES) == 19
    _, label = ds[0]
    label_ids = np.asarray(Image.open(next((root / "gtFine" / "val").glob("*/*_labelIds.png"))))
    for label_id in np.unique(label_ids):
        official = id2label[int(label_id)].trainId
        expected = official if 0 <= official < 255 else 255
        assert set(np.unique(label.numpy()[label_ids == label_id])) == {expected}
    # The fixture's own labelTrainIds file was downscaled separately, so only boundaries may differ.
    train_ids = np.asarray(Image.open(next((root / "gtFine" / "val").glob("*/*_labelTrainIds.png"))))
    assert (label.numpy() == train_ids).mean() > 0.995
    assert CITYSCAPES_CLASSES[0].name == "road" and CITYSCAPES_CLASSES[0].color == (128, 64, 128)


def test_voc_colour_targets_decode_to_class_ids(data_root):
    ds = VOCSegmentation(data_root / "fixtures" / "voc")
    assert len(ds) == 3
    for index in range(len(ds)):
        image, label = ds[index]
        assert image.shape[1:] == label.shape == (513, 513)
        values = set(torch.unique(label).tolist())
        assert 255 in values and 0 in values and values <= set(range(21)) | {255}
        assert len(values - {0, 255}) >= 1  # at least one object class


def test_truncated_image_error_names_the_file(data_root, tmp_path):
    for sub in ("val", "valannot"):
        (tmp_path / sub).mkdir()
    src = sorted((data_root / "camvid" / "val").glob("*.png"))[0]
    shutil.copy(data_root / "camvid" / "valannot" / src.name, tmp_path / "valannot" / src.name)
    data = src.read_bytes()
    (tmp_path / "val" / src.name).write_bytes(data[: len(data) // 3])
    ds = CamVid(tmp_path, "val")
    with pytest.raises(DatasetError, match=src.name):
        ds[0]


def test_missing_label_file_error_names_it(data_root, tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "valannot").mkdir()
    src = sorted((data_root / "camvid" / "val").glob("*.png"))[0]
    shutil.copy(src, tmp_path / "val" / src.name)
    with pytest.raises(DatasetError, match=f"missing file .*valannot/{src.name}"):
        CamVid(tmp_path, "val")
    with pytest.raises(DatasetError, match="missing image folder"):
        CamVid(tmp_path / "nowhere", "val")


def test_label_values_outside_the_table_are_rejected(data_root, tmp_path):
    for sub in ("val", "valannot"):
        (tmp_path / sub).mkdir()
    src = sorted((data_root / "camvid" / "val").glob("*.png"))[0]
    shutil.copy(src, tmp_path / "val" / src.name)
    Image.fromarray(np.full((360, 480), 40, np.uint8)).save(tmp_path / "valannot" / src.name)
    with pytest.raises(DatasetError, match="outside the class table"):
        CamVid(tmp_path, "val")[0]


def test_build_dataset_resizes_real_data(data_root):
    ds = build_dataset("camvid", "val", size=(180, 240))
    image, label = ds[0]
    assert image.shape == (3, 180, 240) and label.shape == (180, 240)
    with pytest.raises(DatasetError, match="unknown dataset"):
        build_dataset("kitti", "val")


def test_augmentation_keeps_image_and_mask_aligned():
    torch.manual_seed(0)
    # The image encodes its own label (8 blocks of distinct grey levels), so alignment can be read back.
    label = torch.arange(8).repeat_interleave(16).repeat(96, 1)[:, :120]  # (96, 120) vertical stripes
    image = (label.float() / 10.0)[None].repeat(3, 1, 1)
    augment = train_augmentation(base_size=(96, 120), crop_size=(64, 80), scale_range=(0.5, 2.0))
    flipped = 0
    for _ in range(20):
        out_image, out_label = augment(image, label)
        assert out_image.shape == (3, 64, 80) and out_label.shape == (64, 80)
        valid = out_label != 255
        # Interior pixels (away from stripe borders and the padding) carry their own label's grey level.
        interior = valid.clone()
        interior[:, 1:] &= out_label[:, 1:] == out_label[:, :-1]
        interior[:, :-1] &= out_label[:, :-1] == out_label[:, 1:]
        decoded = torch.round(out_image[0] * 10.0).long()
        assert interior.sum() > 0
        assert (decoded[interior] == out_label[interior]).float().mean() > 0.99
        if valid.any():
            row = out_label[valid.any(dim=1).nonzero()[0, 0]]
            row = row[row != 255]
            flipped += int(row[0] > row[-1])
    assert flipped > 0  # horizontal flips happened and stayed aligned
