"""Annotation readers on small files written in each dataset's real format."""

from __future__ import annotations

import json

import pytest

from pipeline.data.datasets import read_diving48, read_howto100m, read_kinetics, read_ssv2
from pipeline.data.synthetic import make_corpus


def test_kinetics_csv(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("label,youtube_id,time_start,time_end,split,is_cc\n"
                     "abseiling,---QUuC4vJs,84,94,train,0\n"
                     "air drumming,--nQbRBEz2s,104,114,train,0\n"
                     "abseiling,0a.b/c,1,11,train,1\n")
    test = tmp_path / "test.csv"
    test.write_text("youtube_id,time_start,time_end,split\n--07WQ2iBlw,1,11,test\n")
    m = read_kinetics([train, test])
    assert m.classes == ["abseiling", "air drumming"]
    first = m.entries[0]
    assert (first.video_id, first.label, first.label_name, first.split, first.start, first.end) == (
        "---QUuC4vJs_000084_000094", 0, "abseiling", "train", 84.0, 94.0)
    assert first.filenames == ("---QUuC4vJs_000084_000094.mp4", "---QUuC4vJs.mp4")
    assert m.entries[2].video_id == "0a_b_c_000001_000011"  # safe as a WebDataset key
    assert m.split("test")[0].label == -1


def test_kinetics_missing_column_is_named(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("label,youtube_id,start,end,split\nx,y,1,2,train\n")
    with pytest.raises(ValueError, match=r"bad.csv: missing column\(s\) \['time_start', 'time_end'\]"):
        read_kinetics([bad])


def test_ssv2_json(tmp_path):
    labels = tmp_path / "something-something-v2-labels.json"
    labels.write_text(json.dumps({"Approaching something with your camera": "0",
                                  "Pushing something from left to right": "1"}))
    train = tmp_path / "something-something-v2-train.json"
    train.write_text(json.dumps([
        {"id": "78687", "label": "pushing pen from left to right",
         "template": "Pushing [something] from left to right", "placeholders": ["pen"]},
        {"id": "42326", "label": "approaching door with your camera",
         "template": "Approaching [something] with your camera", "placeholders": ["door"]}]))
    m = read_ssv2(train, labels, "train")
    assert m.classes[1] == "Pushing something from left to right"
    assert [(e.video_id, e.label, e.filenames[0]) for e in m.entries] == [("78687", 1, "78687.webm"),
                                                                         ("42326", 0, "42326.webm")]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "1", "template": "Juggling [something]"}]))
    with pytest.raises(ValueError, match="template 'Juggling something' not in"):
        read_ssv2(bad, labels, "train")


def test_diving48_json(tmp_path):
    vocab = tmp_path / "Diving48_vocab.json"
    vocab.write_text(json.dumps([["Back", "15som", "05Twis", "FREE"], ["Forward", "25som", "NoTwis", "PIKE"]]))
    ann = tmp_path / "Diving48_V2_train.json"
    ann.write_text(json.dumps([{"vid_name": "-mmq0PT-u8k_00155", "label": 1, "start_frame": 30, "end_frame": 105}]))
    m = read_diving48(ann, "train", vocab)
    e = m.entries[0]
    assert (e.label, e.label_name, e.start, e.end) == (1, "Forward_25som_NoTwis_PIKE", 1.0, 3.5)
    with pytest.raises(ValueError, match="label 1 outside 1 classes"):
        vocab.write_text(json.dumps([["Back", "15som", "05Twis", "FREE"]]))
        read_diving48(ann, "train", vocab)


def test_howto100m_csv(tmp_path):
    videos = tmp_path / "HowTo100M_v1.csv"
    videos.write_text("video_id,category_1,category_2,rank,task_id\n"
                      "nVbIUDjzWY4,Cars & Other Vehicles,Motorcycles,27,52907\n"
                      "CTPAZ2euJ2Q,Cars & Other Vehicles,Motorcycles,35,109172\n")
    tasks = tmp_path / "task_ids.csv"
    tasks.write_text("52907\tReplace a Motorcycle Chain\n109172\tRide a Motorcycle\n")
    splits = tmp_path / "split.csv"
    splits.write_text("video_id,split\nnVbIUDjzWY4,test\n")
    m = read_howto100m(videos, tasks)
    assert m.classes == ["Replace a Motorcycle Chain", "Ride a Motorcycle"]
    assert [(e.video_id, e.label, e.split) for e in m.entries] == [("nVbIUDjzWY4", 0, "train"),
                                                                   ("CTPAZ2euJ2Q", 1, "train")]
    only_test = read_howto100m(videos, tasks, splits)
    assert [(e.video_id, e.split) for e in only_test.entries] == [("nVbIUDjzWY4", "test")]


def test_the_synthetic_corpus_is_a_kinetics_style_dataset(tmp_path):
    csv_path = make_corpus(tmp_path, "motion", per_class={"train": 1, "val": 1})
    m = read_kinetics([csv_path], dataset="synthetic")
    assert m.classes == sorted(["moving_left", "moving_right", "moving_up", "moving_down"])
    assert len(m.split("train")) == 4 and len(m.split("val")) == 4
    for e in m.entries:
        assert any((tmp_path / "videos" / name).exists() for name in e.filenames)
