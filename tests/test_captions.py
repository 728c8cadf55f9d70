"""Caption files as pretraining and eval read them: JSON Lines and CSV, the `split` key, and the files
found by default (the workspace, beside the extracted roots, `val.jsonl` beside the training file)."""

import json
from pathlib import Path

import pytest

from test_pretrain import write_cache
from vlpcache.cache.reader import RegionCache
from vlpcache.cache.writer import ShardWriter
from vlpcache.captions import Captions, read_captions
from vlpcache.errors import UserError
from vlpcache.model.data import find_caption_files, load_pretrain_data
from vlpcache.workspace import Workspace
from waiting import HANG_GUARD_S


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def trained_captions(data) -> dict[str, list[str]]:
    """Item id -> captions of every training sample of load_pretrain_data's result."""
    return {data.caches[c].ids[i]: texts for c, i, texts in data.train.samples}


def validation_captions(data) -> dict[str, list[str]]:
    return {data.caches[c].ids[i]: texts for (c, i), texts in zip(data.validation.locations, data.validation.captions)}


@pytest.fixture
def cache(tmp_path) -> Path:
    write_cache(tmp_path / "cache", 6)  # v0..v5
    return tmp_path / "cache"


def test_csv_rows_become_captions_several_per_video_quoted_commas_kept(tmp_path):
    csv = tmp_path / "c.csv"
    csv.write_text('video,caption,extra\nv0,a dog runs,x\nv1,"a cat, then a dog",y\nv0,the dog again,z\nv2,,w\n,orphan,q\n')
    captions = read_captions(csv)
    assert captions.by_id == {"v0": ["a dog runs", "the dog again"], "v1": ["a cat, then a dog"]}
    assert captions.empty_captions == 1 and captions.bad_lines == 1  # v2's empty caption; the row without a video


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-8-sig"])
def test_files_saved_as_unicode_text_by_windows_tools_read_as_their_byte_order_mark_says(tmp_path, encoding):
    # Excel's "Unicode Text" and Windows PowerShell's `>` write UTF-16 with a byte-order mark, lines ending in CRLF
    marks = {"utf-16-le": "\ufeff", "utf-16-be": "\ufeff"}  # the plain codecs write no mark of their own
    csv = tmp_path / "c.csv"
    csv.write_bytes((marks.get(encoding, "") + "video,caption\r\nv0,un café au lait\r\nv1,a dog\r\n").encode(encoding))
    assert read_captions(csv).by_id == {"v0": ["un café au lait"], "v1": ["a dog"]}
    tsv = tmp_path / "c.txt"  # the id-and-caption lines, tab-separated as Excel saves them
    tsv.write_bytes((marks.get(encoding, "") + "v0\tun café\r\nv1\ta dog\r\n").encode(encoding))
    assert read_captions(tsv).by_id == {"v0": ["un café"], "v1": ["a dog"]}


def test_a_file_marked_utf16_that_is_not_is_one_line_naming_it(tmp_path):
    path = tmp_path / "c.csv"
    path.write_bytes("video,caption\nv0,a dog\n".encode("utf-16") + b"\x00")  # an odd byte at the end: cut short
    with pytest.raises(UserError, match=r"c\.csv: not UTF-16 text, though it starts with UTF-16's byte-order mark "
                                        r"\(truncated data at byte 48\); save the file as UTF-8$"):
        read_captions(path)


def test_malformed_json_lines_are_counted_and_the_first_named_never_a_traceback(tmp_path, cache):
    path = tmp_path / "c.jsonl"
    path.write_text('\ufeff{"video": "v0", "captions": ["a dog", "", null, ["nested"]]}\r\n\r\n'
                    '{"video": "v1", "captions": "one caption"}\r\n'
                    '{"video": "v2", "captions": 5}\n'  # line 4: the first bad one
                    '{"video": null, "captions": ["x"]}\n{"video": "v3", "captions": {"a": "b"}}\n'
                    '{not json\n["a list"]\n{"captions": ["no id"]}\n{"video": "v4", "captions": [7, true]}\n')
    captions = read_captions(path)
    assert captions.by_id == {"v0": ["a dog"], "v1": ["one caption"], "v4": ["7"]}
    assert captions.empty_captions == 4 and captions.bad_lines == 6  # "", null, ["nested"], true
    assert captions.first_bad_line == f'{path} line 4: "captions" is not a list of texts'
    data = load_pretrain_data([cache], [path], None, workspace=Workspace(tmp_path / "ws"))
    assert f"6 unreadable caption lines (the first: {path} line 4: " in data.train_report.line()


def test_a_nul_in_a_caption_is_left_out_as_the_tokenizer_leaves_it(tmp_path):
    path = tmp_path / "c.jsonl"
    write_jsonl(path, [{"video": "v0", "captions": ["a dog\u0000 runs", "\u0000"]}, {"video": "v1", "caption": "a cat"}])
    captions = read_captions(path)
    assert captions.by_id == {"v0": ["a dog runs"], "v1": ["a cat"]} and captions.empty_captions == 1


def test_a_csv_without_video_and_caption_columns_is_one_error_naming_the_file(tmp_path):
    csv = tmp_path / "c.csv"
    csv.write_text("id,text\nv0,a dog\n")
    with pytest.raises(UserError, match=r"c\.csv: a CSV caption file needs a video column \(video, video_id, videoid, "
                                        r"image, image_name, image_id, file_name, filename, id\) and a "
                                        r"caption column \(caption, sentence, name, comment, descriptions\), separated by commas, "
                                        r"semicolons, tabs or pipes; its header has id, text$"):
        read_captions(csv)


@pytest.mark.parametrize("name, text, layout", [
    ("excel.csv", "Video;Caption\nv0;a hand holds a box, then drops it\nv1;a dog\n", "CSV, semicolon-separated"),
    ("c.tsv", "video\tcaption\nv0\ta hand holds a box, then drops it\nv1\ta dog\n", "CSV, tab-separated"),
    ("tabs.csv", "video\tcaption\nv0\ta hand holds a box, then drops it\nv1\ta dog\n", "CSV, tab-separated"),
    ("pipes.csv", "video|caption\nv0|a hand holds a box, then drops it\nv1|a dog\n", "CSV, pipe-separated"),
    ("c.tsv", "video,caption\nv0,\"a hand holds a box, then drops it\"\nv1,a dog\n", "CSV"),
], ids=["semicolons", "tsv", "tabs-in-csv", "pipes", "commas-in-tsv"])
def test_csv_columns_separated_by_what_the_header_shows_commas_in_captions_kept(tmp_path, name, text, layout):
    path = tmp_path / name
    path.write_text(text)
    captions = read_captions(path)
    assert captions.by_id == {"v0": ["a hand holds a box, then drops it"], "v1": ["a dog"]}
    assert captions.layout == layout


@pytest.mark.parametrize("header, rows", [
    ("videoid,contentUrl,duration,page_dir,name", ["1,http://x/1.mp4,PT00H00M10S,000001_000050,a dog runs",
                                                   "2,http://x/2.mp4,PT00H00M05S,000001_000050,\"a cat, sleeping\""]),
    ("key,vid_key,video_id,sentence", ["ret0,msr0,1,a dog runs", "ret1,msr1,2,\"a cat, sleeping\""]),
    ("Video , Caption", ["1,a dog runs", "2,\"a cat, sleeping\""]),
    ("image,caption", ["1,a dog runs", "2,\"a cat, sleeping\""]),  # Kaggle's Flickr8k captions.txt
    ("image_name| comment_number| comment", ["1| 0| a dog runs", "2| 0| a cat, sleeping"]),  # Flickr30k's results.csv
    ("file_name,caption", ["1,a dog runs", "2,\"a cat, sleeping\""]),
    ("\n\n\"video\",\"caption\"", ["1,a dog runs", "2,\"a cat, sleeping\""]),  # blank lines, then a quoted header
], ids=["webvid", "clip4clip", "capitals", "flickr8k-kaggle", "flickr30k-kaggle", "file_name", "blank-lines-first"])
def test_csv_files_of_webvid_and_clip4clip_are_read_by_their_own_column_names(tmp_path, header, rows):
    csv = tmp_path / "c.csv"
    csv.write_text("\n".join([header, *rows]) + "\n")
    assert read_captions(csv).by_id == {"1": ["a dog runs"], "2": ["a cat, sleeping"]}


def test_charades_csv_trains_on_each_of_a_videos_descriptions_and_validates_on_the_test_file(tmp_path):
    write_cache(tmp_path / "cache", 3, prefix="46GP")  # Charades_v1_480/46GP0.mp4 ...
    header = "id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length\n"
    row = ('{0},HR43,Kitchen,6,7,Yes,"A person cooks on a stove.",food;stove,"A person is cooking.;The person eats '
           'food, then leaves.;",c092 11.90 21.20;c147 0.00 12.60,24.83\n')
    train, test = tmp_path / "Charades_v1_train.csv", tmp_path / "Charades_v1_test.csv"
    train.write_text(header + row.format("46GP0") + row.format("46GP1"))
    test.write_text(header + row.format("46GP2"))
    data = load_pretrain_data([tmp_path / "cache"], [train], test, workspace=Workspace(tmp_path / "ws"))
    descriptions = ["A person is cooking.", "The person eats food, then leaves."]
    assert trained_captions(data) == {"46GP0": descriptions, "46GP1": descriptions}
    assert validation_captions(data) == {"46GP2": descriptions}
    assert read_captions(train).empty_captions == 0


def test_a_json_document_listing_the_json_lines_objects_reads_the_same_and_counts_bad_records(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"video": "v0", "captions": ["a dog"]}, {"video": "v1"},
                                {"video": "v2", "captions": "one", "split": "val"}], indent=2))
    captions = read_captions(path)
    assert captions.by_id == {"v0": ["a dog"], "v2": ["one"]} and captions.splits == {"v2": "val"}
    assert captions.bad_lines == 1 and captions.first_bad_line == f'{path} record 2: no "captions" key'


def msrvtt_annotations(path: Path) -> Path:
    """MSR-VTT's own train_val_videodatainfo.json, in small: its splits are train, validate and test."""
    videos = [{"category": 9, "url": "https://www.youtube.com/watch?v=x", "video_id": f"video{i}", "start time": 1.0,
               "end time": 9.0, "split": split, "id": i} for i, split in enumerate(["train"] * 3 + ["validate", "test"])]
    sentences = [{"caption": f"caption {n} of video {i}", "video_id": f"video{i}", "sen_id": 2 * i + n}
                 for i in range(5) for n in range(2)] + [{"caption": "no id"}]
    path.write_text(json.dumps({"info": {"year": 2016}, "videos": videos, "sentences": sentences}))
    return path


def test_msrvtt_own_annotation_file_trains_on_its_train_videos_and_validates_on_validate_by_default(tmp_path):
    write_cache(tmp_path / "cache", 6, prefix="video")  # video0..video5
    annotations = msrvtt_annotations(tmp_path / "train_val_videodatainfo.json")
    captions = read_captions(annotations)
    assert captions.by_id["video3"] == ["caption 0 of video 3", "caption 1 of video 3"] and len(captions) == 5
    assert captions.bad_lines == 1 and captions.first_bad_line == f'{annotations} sentence 11: no "video_id"'
    for given in (annotations, None):  # --val-captions the same file, or left out: the file's own validate split
        data = load_pretrain_data([tmp_path / "cache"], [annotations], given, workspace=Workspace(tmp_path / "ws"))
        assert sorted(trained_captions(data)) == ["video0", "video1", "video2"]
        assert validation_captions(data) == {"video3": ["caption 0 of video 3", "caption 1 of video 3"]}
        assert data.validation_file == annotations
        assert data.summary()[0] == f"training captions: {annotations} (MSR-VTT's annotations)"


def test_karpathy_split_files_key_images_by_file_name_and_keep_their_splits(tmp_path):
    images = [{"filename": "1000268201_693b08cb0e.jpg", "imgid": 0, "split": "train",
               "sentences": [{"tokens": ["a", "child"], "raw": "A child climbs .", "imgid": 0, "sentid": 0},
                             {"raw": "A girl in pink .", "sentid": 1}]},
              {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "split": "restval",
               "sentences": [{"raw": "A man rides a bike ."}, {"tokens": []}]},
              {"split": "test"}]
    path = tmp_path / "dataset_flickr8k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr8k"}))
    captions = read_captions(path)
    assert captions.by_id == {"1000268201_693b08cb0e.jpg": ["A child climbs .", "A girl in pink ."],
                              "val2014/COCO_val2014_000000391895.jpg": ["A man rides a bike ."]}
    assert captions.splits == {"1000268201_693b08cb0e.jpg": "train", "val2014/COCO_val2014_000000391895.jpg": "restval"}
    assert captions.empty_captions == 1 and captions.first_bad_line == f'{path} image 3: no "filename"'
    matched, _ = captions.matched_to(["1000268201_693b08cb0e", "COCO_val2014_000000391895"])
    assert sorted(matched.by_id) == ["1000268201_693b08cb0e", "COCO_val2014_000000391895"]


def test_coco_caption_annotations_name_each_image_by_its_file_name(tmp_path):
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps({"info": {}, "licenses": [],
                                "images": [{"id": 139, "file_name": "000000000139.jpg", "height": 426, "width": 640}],
                                "annotations": [{"image_id": 139, "id": 1, "caption": "A room with chairs."},
                                                {"image_id": 139, "id": 2, "caption": "A living room."},
                                                {"image_id": 7, "id": 3, "caption": "An image not listed."}]}))
    captions = read_captions(path)
    assert captions.by_id == {"000000000139.jpg": ["A room with chairs.", "A living room."]}
    assert captions.first_bad_line == f"{path} annotation 3: no image with its image_id"


def test_json_lines_of_one_caption_each_and_didemo_and_activitynet_files_are_read(tmp_path):
    per_caption = write_jsonl(tmp_path / "c.jsonl", [{"video_id": "a.mp4", "caption": "one"},
                                                     {"video_id": "a.mp4", "caption": "two"}])
    assert read_captions(per_caption).by_id == {"a.mp4": ["one", "two"]}
    one_line = write_jsonl(tmp_path / "single.jsonl", [{"video": "b", "caption": "only"}])
    assert read_captions(one_line).by_id == {"b": ["only"]}
    didemo = tmp_path / "train_data.json"  # DiDeMo: one object per moment, the video by its file name
    didemo.write_text(json.dumps([
        {"annotation_id": 0, "description": "the dog jumps", "video": "12090392@N02_13482799053_87ef417396.mov",
         "times": [[2, 2]], "num_segments": 6},
        {"annotation_id": 1, "description": "a red car", "video": "12090392@N02_13482799053_87ef417396.mov"}]))
    assert read_captions(didemo).by_id == {"12090392@N02_13482799053_87ef417396.mov": ["the dog jumps", "a red car"]}
    activitynet = tmp_path / "val_1.json"
    activitynet.write_text(json.dumps({
        "v_uqiMw7tQ1Cc": {"duration": 55.15, "timestamps": [[0.28, 55.15], [13.79, 54.32]],
                          "sentences": ["A weight lifting tutorial is given.", "  The coach helps the guy."]},
        "v_bXdq2zI1Ms0": {"duration": 73.1, "sentences": []}, "v_one": {"duration": 1.0, "sentences": "x"},
        "v_none": {"duration": 1.0}}))
    captions = read_captions(activitynet)
    assert captions.by_id == {"v_uqiMw7tQ1Cc": ["A weight lifting tutorial is given.", "The coach helps the guy."],
                              "v_one": ["x"]}
    assert captions.first_bad_line == f'{activitynet} video 4: no "sentences" list'


def test_vatex_files_train_on_the_english_captions_of_each_video_id(tmp_path):
    write_cache(tmp_path / "cache", 2, prefix="Ptf_2VRj-V0_00012")  # Ptf_2VRj-V0_000120, ..._000121
    vatex = tmp_path / "vatex_training_v1.0.json"  # VATEX: a list of {"videoID", "enCap": [10], "chCap": [10]}
    vatex.write_text(json.dumps([{"videoID": f"Ptf_2VRj-V0_00012{i}", "enCap": [f"a man sings {i}", f"a song {i}"],
                                  "chCap": ["一个男人在唱歌。"]} for i in range(2)], ensure_ascii=False))
    captions = read_captions(vatex)
    assert captions.by_id == {"Ptf_2VRj-V0_000120": ["a man sings 0", "a song 0"],
                              "Ptf_2VRj-V0_000121": ["a man sings 1", "a song 1"]}
    data = load_pretrain_data([tmp_path / "cache"], [vatex], None, workspace=Workspace(tmp_path / "ws"))
    assert trained_captions(data) == captions.by_id


def test_youcook2_annotations_train_on_training_validate_on_validation_and_say_segments_are_whole_videos(tmp_path):
    write_cache(tmp_path / "cache", 3, prefix="training/113/GLd3aX16zB")  # ids ending in YouTube ids, raw_videos' folders
    segments = [{"segment": [90, 102], "id": 0, "sentence": "spread margarine on bread"},
                {"segment": [114, 127], "id": 1, "sentence": "place a slice of cheese on the bread"}]
    database = {f"GLd3aX16zB{i}": {"subset": subset, "duration": 241.6, "recipe_type": "113", "annotations": segments,
                                   "video_url": "https://www.youtube.com/watch?v=x"}
                for i, subset in enumerate(["training", "training", "validation"])}
    path = tmp_path / "youcook2_annotations_trainval.json"
    path.write_text(json.dumps({"database": database}))
    captions = read_captions(path)
    assert captions.by_id["GLd3aX16zB2"] == ["spread margarine on bread", "place a slice of cheese on the bread"]
    data = load_pretrain_data([tmp_path / "cache"], [path], None, workspace=Workspace(tmp_path / "ws"))
    assert sorted(trained_captions(data)) == ["training/113/GLd3aX16zB0", "training/113/GLd3aX16zB1"]
    assert list(validation_captions(data)) == ["training/113/GLd3aX16zB2"]
    assert data.summary()[0] == (f"training captions: {path} (YouCook2's annotations, each segment's sentence taken as a "
                                 "caption of its whole video; eval --paragraphs joins them into one query per video, "
                                 "the paragraph-to-video protocol)")
    activitynet = tmp_path / "ActivityNet" / "train.json"  # labels of actions, not sentences: not YouCook2's
    activitynet.parent.mkdir()
    activitynet.write_text(json.dumps({"database": {"x": {"subset": "training", "annotations": [{"label": "Drinking"}]}}}))
    with pytest.raises(UserError, match="a JSON document of a layout vlpcache does not know"):
        read_captions(activitynet)


def test_msvd_video_corpus_csv_reads_english_rows_as_captions_of_clips_named_videoid_start_end(tmp_path):
    corpus = tmp_path / "video_corpus.csv"  # MSVD's own release: one row per sentence, in many languages
    corpus.write_text("\nVideoID,Start,End,WorkerID,Source,AnnotationTime,Language,Description\n"
                      "mv89psg6zh4,33,46,1,unverified,10,English,\"A bird, in a sink.\"\n"
                      "mv89psg6zh4,33,46,2,clean,12,German,Ein Vogel in einem Waschbecken.\n"
                      "mv89psg6zh4,33,46,3,clean,9,english,A parakeet is bathing\n"
                      "-4wsuPCjDBc,5,15,4,clean,7,English,a squirrel eats\n"
                      "-4wsuPCjDBc,5,15,5,clean,8,English,A man walks, then runs, fast\n"  # a comma unquoted: not cut there
                      "-4wsuPCjDBc,5\n")
    captions = read_captions(corpus)
    assert captions.by_id == {"mv89psg6zh4_33_46": ["A bird, in a sink.", "A parakeet is bathing"],
                              "-4wsuPCjDBc_5_15": ["a squirrel eats", "A man walks, then runs, fast"]}
    assert captions.layout == ("MSVD's video_corpus.csv (clips VideoID_Start_End, English), 1 sentence(s) in other "
                               "languages left aside, 1 caption(s) with an unquoted comma read whole")
    assert captions.first_bad_line == f"{corpus} line 8: 2 fields where the header has 8"


def test_text_files_of_an_id_and_a_caption_per_line_are_read_as_msvd_and_flickr_ship_them(tmp_path):
    msvd = tmp_path / "AllVideoDescriptions.txt"
    msvd.write_text("# MSVD: video id, then its caption\n\n-4wsuPCjDBc_5_15 a squirrel is eating a peanut\n"
                    "-4wsuPCjDBc_5_15 a chipmunk eats\nlonely_id\n")
    captions = read_captions(msvd)
    assert captions.by_id == {"-4wsuPCjDBc_5_15": ["a squirrel is eating a peanut", "a chipmunk eats"]}
    assert captions.first_bad_line == f"{msvd} line 5: not an id and a caption"
    flickr = tmp_path / "Flickr8k.token.txt"
    flickr.write_text("1000268201_693b08cb0e.jpg#0\tA child in a pink dress .\n"
                      "1000268201_693b08cb0e.jpg#1\tA girl going into a wooden building .\n")
    assert read_captions(flickr).by_id == {"1000268201_693b08cb0e.jpg": ["A child in a pink dress .",
                                                                         "A girl going into a wooden building ."]}
    named_txt = write_jsonl(tmp_path / "captions.txt", [{"video": "v0", "captions": ["json after all"]}])
    assert read_captions(named_txt).by_id == {"v0": ["json after all"]}
    # Kaggle's Flickr8k captions.txt is CSV, header and all; without its header, a file name then a comma
    kaggle = tmp_path / "kaggle" / "captions.txt"
    kaggle.parent.mkdir()
    rows = ['1000268201_693b08cb0e.jpg,A child in a pink dress .', '1000268201_693b08cb0e.jpg,"A girl, going in ."']
    kaggle.write_text("\n".join(["image,caption", *rows]) + "\n")
    expected = {"1000268201_693b08cb0e.jpg": ["A child in a pink dress .", "A girl, going in ."]}
    assert read_captions(kaggle).by_id == expected and read_captions(kaggle).layout == "CSV"
    # its header quoted, as pandas' to_csv(quoting=csv.QUOTE_ALL) writes it: a CSV still, not an id `"1000...jpg","A`
    kaggle.write_text("\n".join(['"image","caption"', *(f'"{a}","{b.strip(chr(34))}"' for a, b in (r.split(",", 1) for r in rows))]))
    assert read_captions(kaggle).by_id == expected and read_captions(kaggle).layout == "CSV"
    kaggle.write_text("\n".join(["1000268201_693b08cb0e.jpg,A child in a pink dress .",
                                 "1000268201_693b08cb0e.jpg,A girl, going in ."]) + "\n")
    assert read_captions(kaggle).by_id == expected
    split_list = tmp_path / "Flickr_8k.devImages.txt"  # no captions: a split's file names
    split_list.write_text("1000268201_693b08cb0e.jpg\n1001773457_577c3a7d70.jpg\n")
    with pytest.raises(UserError, match=r"Flickr_8k\.devImages\.txt: a list of file names without captions .* "
                                        r"`grep -F -f Flickr_8k\.devImages\.txt Flickr8k\.token\.txt > "
                                        r"Flickr_8k\.devImages\.token\.txt`$"):
        read_captions(split_list)


def test_lsmdc_and_tgif_tab_separated_files_without_a_header_train_on_their_ids_and_sentences(tmp_path):
    cache = tmp_path / "cache"
    ids = write_cache(cache, 2, prefix="1001_Flight/1001_Flight_00.00.45.321-00.00.48.10")  # LSMDC's clips by movie
    ids += write_cache(cache, 2, prefix="tumblr_mevmyaKtDf1rgvhr8o1_50", seed=1)  # TGIF's GIFs by file name
    lsmdc = tmp_path / "LSMDC16_annos_training.csv"  # clip id, start and end aligned, start and end extracted, sentence
    lsmdc.write_text("".join(f"{i.split('/')[1]}\t00.00.45.321\t00.00.48.10{n}\t00.00.45.300\t00.00.48.200\tSOMEONE sits down.\n"
                             for n, i in enumerate(ids[:2])))
    tgif = tmp_path / "tgif-v1.0.tsv"  # the GIF's URL, a tab, a caption
    tgif.write_text("".join(f"https://38.media.tumblr.com/9f6c25cc350f12aa74a7dc386a5c4985/{i}.gif\ta cat {n} jumps\n"
                            for n, i in enumerate(ids[2:])))
    clips = [i.split("/")[1] for i in ids[:2]]  # named by the clip alone, below its movie's folder
    assert read_captions(lsmdc).by_id == {clips[0]: ["SOMEONE sits down."], clips[1]: ["SOMEONE sits down."]}
    assert read_captions(lsmdc).layout == "LSMDC's clip id, times and sentence"
    data = load_pretrain_data([cache], [lsmdc, tgif], None, workspace=Workspace(tmp_path / "ws"))
    assert trained_captions(data) == {ids[0]: ["SOMEONE sits down."], ids[1]: ["SOMEONE sits down."],
                                      ids[2]: ["a cat 0 jumps"], ids[3]: ["a cat 1 jumps"]}


def test_a_file_of_which_no_caption_can_be_read_is_one_error_naming_its_first_bad_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{not json\n["a list"]\n')
    with pytest.raises(UserError, match=r"c\.jsonl: no caption could be read \(2 unreadable, the first: line 1: not JSON"):
        read_captions(path)


def test_a_folder_of_text_files_beside_images_gives_each_image_its_captions(tmp_path):
    # img2dataset's "files" output, as CC3M is usually downloaded: 00000/000000000.jpg, .txt, .json
    shard = tmp_path / "cc3m" / "00000"
    shard.mkdir(parents=True)
    for i, text in enumerate([b"a dog on a beach\n", b"", b"two\r\nlines\n", b"caf\xe9"]):
        (shard / f"00000000{i}.jpg").write_bytes(b"x")
        (shard / f"00000000{i}.txt").write_bytes(text)
        (shard / f"00000000{i}.json").write_text("{}")
    (shard / "000000009.txt").write_text("no image of this name")
    (tmp_path / "cc3m" / "README.txt").write_text("not a caption")
    captions = read_captions(tmp_path / "cc3m")
    assert captions.by_id == {"00000/000000000": ["a dog on a beach"], "00000/000000002": ["two", "lines"]}
    assert captions.empty_captions == 1 and captions.bad_lines == 1
    assert captions.first_bad_line == f"{shard / '000000003.txt'}: not UTF-8 text"
    matched, _ = captions.matched_to(["cc3m/00000/000000000", "cc3m/00000/000000002"])  # extracted from tmp_path
    assert sorted(matched.by_id) == ["cc3m/00000/000000000", "cc3m/00000/000000002"]

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: a folder of captions holds a \.txt file beside each image or video"):
        read_captions(tmp_path / "empty")


def test_a_json_document_of_an_unknown_layout_is_one_error_naming_its_keys(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"database": {"v_x": {"annotations": []}}, "version": "1.3"}))
    with pytest.raises(UserError, match=r"c\.json: a JSON document of a layout vlpcache does not know \(top level: "
                                        r"'database', 'version'\); caption files are JSON Lines"):
        read_captions(path)


def test_pretraining_trains_on_csv_captions_mixed_with_json_lines(tmp_path, cache):
    csv = tmp_path / "more.csv"
    csv.write_text("video,caption\nv3,a csv caption\nv4,another one\nv3,a second csv caption\n")
    jsonl = write_jsonl(tmp_path / "train.jsonl", [{"video": "v0", "captions": ["a json caption"]}])
    data = load_pretrain_data([cache], [jsonl, csv], None, workspace=Workspace(tmp_path / "ws"))
    assert trained_captions(data) == {"v0": ["a json caption"], "v3": ["a csv caption", "a second csv caption"],
                                      "v4": ["another one"]}


def test_the_split_key_keeps_val_and_test_items_out_of_training(tmp_path, cache):
    train = write_jsonl(tmp_path / "all.jsonl", [
        {"video": "v0", "captions": ["zero"], "split": "train"},
        {"video": "v1", "captions": ["one"], "split": "val"},
        {"video": "v2", "captions": ["two"], "split": "test"},
        {"video": "v3", "captions": ["three"]},  # no split: training
        {"video": "v4", "captions": ["four"], "split": "Validation"},
    ])
    data = load_pretrain_data([cache], [train], None, workspace=Workspace(tmp_path / "ws"))
    assert trained_captions(data) == {"v0": ["zero"], "v3": ["three"]}
    assert data.held_out_skipped == 3 and any("3 captioned items of val/test splits left out" in line for line in data.summary())
    assert validation_captions(data) == {"v1": ["one"], "v4": ["four"]}  # no --val-captions: the file's val split
    assert f"validation ({train}): 2 videos, 2 captions as queries" in data.summary()
    assert data.summary()[0] == f"training captions: {train} (JSON Lines)"
    assert "training: the caption files' splits train (1 id), none (1 id)" in data.summary()


def test_a_split_named_otherwise_than_training_is_pointed_out_and_testing_is_held_out(tmp_path, cache):
    # YouCook2's and others' "testing", an evaluation set's own name: a test set trained on without a word
    train = write_jsonl(tmp_path / "all.jsonl", [
        {"video": "v0", "captions": ["zero"], "split": "training"},
        {"video": "v1", "captions": ["one"], "split": "testing"},
        {"video": "v2", "captions": ["two"], "split": "eval_b"},
    ])
    data = load_pretrain_data([cache], [train], None, workspace=Workspace(tmp_path / "ws"))
    assert trained_captions(data) == {"v0": ["zero"], "v2": ["two"]}
    assert ("training: the caption files' splits training (1 id), eval_b (1 id); 'eval_b' is trained on: if held "
            "out, give a file without it") in data.summary()


def test_caption_ids_that_are_the_cache_names_with_a_prefix_are_said_so(tmp_path, cache):
    # ActivityNet's ids are v_ + a YouTube id; a crawler that saved the bare ids (or the other way round)
    # met only "no cached item has a caption", showing one id of each side
    for name, ids in (("prefixed", [f"v_v{i}" for i in range(6)]), ("bare", ["0", "1", "2", "3", "4", "5"])):
        captions = write_jsonl(tmp_path / f"{name}.jsonl", [{"video": i, "captions": ["a caption"]} for i in ids])
        with pytest.raises(UserError) as raised:
            load_pretrain_data([cache], [captions], None, workspace=Workspace(tmp_path / "ws"))
        side, other, prefix = ("caption ids", "cached names", "v_") if name == "prefixed" else ("cached names", "caption ids", "v")
        assert f"the {side} are the {other} with {prefix!r} in front (as ActivityNet's `v_` ids)" in str(raised.value)
    unrelated = write_jsonl(tmp_path / "other.jsonl", [{"video": f"x{i}", "captions": ["a caption"]} for i in range(6)])
    with pytest.raises(UserError) as raised:
        load_pretrain_data([cache], [unrelated], None, workspace=Workspace(tmp_path / "ws"))
    assert "in front" not in str(raised.value)


def test_an_item_given_two_splits_is_held_out_where_one_of_them_is_and_the_conflict_is_said(tmp_path, cache):
    """Rows (or files) that give an item test, then train: the last row won, and the test item's captions were
    trained on without a word. Now a held-out split wins over one that is not, and the summary says so."""
    rows = tmp_path / "rows.jsonl"
    write_jsonl(rows, [{"video": "v0", "captions": ["a"], "split": "test"}, {"video": "v0", "captions": ["b"], "split": "train"},
                       {"video": "v1", "captions": ["c"], "split": "train"}, {"video": "v2", "captions": ["d"], "split": "train"},
                       {"video": "v2", "captions": ["e"], "split": "restval"}])
    captions = read_captions(rows)
    assert captions.splits == {"v0": "test", "v1": "train", "v2": "restval"} and captions.split_conflicts == 2
    data = load_pretrain_data([cache], [rows], None, workspace=Workspace(tmp_path / "ws"))
    assert trained_captions(data) == {"v1": ["c"], "v2": ["d", "e"]}
    assert ("note: 2 caption rows give an item another split than an earlier one (the first: 'v0': test, then train): "
            "such an item takes its held-out split (val, test...) where it has one, else the last, and is never "
            "trained on once held out") in data.summary()
    other = tmp_path / "other.csv"  # two files: the second's train does not undo the first's val
    other.write_text("video,caption,split\nv1,f,val\n")
    data = load_pretrain_data([cache], [other, rows], None, workspace=Workspace(tmp_path / "ws"))
    assert trained_captions(data) == {"v2": ["d", "e"]} and validation_captions(data) == {"v1": ["f"]}
    named = tmp_path / "named.jsonl"  # two keys of one item, its id and its file name: the last of them won, unsaid
    write_jsonl(named, [{"video": "v3", "captions": ["g"], "split": "test"}, {"video": "v3.mp4", "captions": ["h"], "split": "train"},
                        {"video": "v4", "captions": ["i"], "split": "train"}])
    data = load_pretrain_data([cache], [named], None, workspace=Workspace(tmp_path / "ws"))
    assert trained_captions(data) == {"v4": ["i"]} and any("(the first: 'v3': test, then train)" in line for line in data.summary())


def test_a_hand_written_csv_its_split_column_honoured_and_unquoted_commas_read_whole(tmp_path, cache):
    """As a spreadsheet user writes it: a Split column (not only JSON Lines' "split" key keeps val and test
    out of training), CRLF line ends, and captions with commas nobody quoted: each read whole, not cut
    at the first comma with the rest dropped unsaid."""
    path = tmp_path / "mine.csv"
    path.write_bytes(b"Video,Caption,Split\r\nv0,a hand turns a box over, then puts it down,train\r\n"
                     b"v1,one,val\r\nv2,\"two, quoted\",test\r\nv3,a dog, a cat, a bird,\r\n\r\nv4,four,Validation\r\n")
    captions = read_captions(path)
    assert captions.by_id == {"v0": ["a hand turns a box over, then puts it down"], "v1": ["one"], "v2": ["two, quoted"],
                              "v3": ["a dog, a cat, a bird"], "v4": ["four"]}
    assert captions.splits == {"v0": "train", "v1": "val", "v2": "test", "v4": "Validation"}  # v3 has none
    assert captions.layout == "CSV, 2 caption(s) with an unquoted comma read whole" and captions.bad_lines == 0
    data = load_pretrain_data([cache], [path], None, workspace=Workspace(tmp_path / "ws"))
    assert trained_captions(data) == {"v0": ["a hand turns a box over, then puts it down"], "v3": ["a dog, a cat, a bird"]}
    assert validation_captions(data) == {"v1": ["one"], "v4": ["four"]}
    assert data.summary()[0] == f"training captions: {path} (CSV, 2 caption(s) with an unquoted comma read whole)"
    trailing = tmp_path / "trailing.csv"  # rows that end in a separator the header has not: no caption's
    trailing.write_text("video,caption\nv0,a dog,\nv1,a cat, then a dog,,\n")
    assert read_captions(trailing).by_id == {"v0": ["a dog"], "v1": ["a cat, then a dog"]}
    semicolons = tmp_path / "excel.csv"  # the caption column in the middle, its separator unquoted
    semicolons.write_text("Video;Caption;Split\nv0;first; then second;train\n")
    assert read_captions(semicolons).by_id == {"v0": ["first; then second"]}
    assert read_captions(semicolons).splits == {"v0": "train"}


def test_a_validation_file_with_splits_validates_on_its_val_items_only(tmp_path, cache):
    train = write_jsonl(tmp_path / "train.jsonl", [{"video": "v0", "captions": ["zero"]}])
    val = write_jsonl(tmp_path / "all.jsonl", [
        {"video": "v0", "captions": ["zero"], "split": "train"},
        {"video": "v1", "captions": ["one"], "split": "val"},
        {"video": "v2", "captions": ["two", "deux"], "split": "val"},
        {"video": "v3", "captions": ["three"], "split": "test"},
    ])
    data = load_pretrain_data([cache], [train], val, workspace=Workspace(tmp_path / "ws"))
    assert validation_captions(data) == {"v1": ["one"], "v2": ["two", "deux"]}


def extracted_layout(tmp_path: Path) -> tuple[Workspace, Path]:
    """dataset/frames/{train,val} extracted, dataset/train.jsonl and dataset/val.jsonl beside them."""
    dataset = tmp_path / "dataset"
    for split in ("train", "val"):
        (dataset / "frames" / split).mkdir(parents=True)
    write_jsonl(dataset / "train.jsonl", [{"video": f"v{i}", "captions": [f"train {i}"]} for i in range(4)])
    write_jsonl(dataset / "val.jsonl", [{"video": f"v{i}", "captions": [f"val {i}"]} for i in (4, 5)])
    workspace = Workspace(tmp_path / "ws")
    workspace.remember_roots([dataset / "frames" / "train", dataset / "frames" / "val"])
    return workspace, dataset


def test_roots_are_remembered_once_and_a_workspace_that_cannot_be_written_keeps_its_record(tmp_path, monkeypatch):
    # another user's workspace stopped `extract -o MY_CACHE` run in it with EACCES before anything was done
    import errno

    from vlpcache import workspace as workspace_module

    workspace, dataset = extracted_layout(tmp_path)

    def denied(path, data, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(workspace_module, "write_json", denied)
    workspace.remember_roots([dataset / "frames" / "train"])  # known: nothing to write
    workspace.remember_roots([dataset / "other"])  # new, not writable: the record stays as it was
    assert workspace.extracted_roots() == [str((dataset / "frames" / split).resolve()) for split in ("train", "val")]


def test_extracts_started_together_each_keep_their_root(tmp_path):
    # each read roots.json, then wrote what it read plus its own root: of 8 started together, 1 or 2 roots stayed
    # (pretrain's default captions, found beside the extracted roots, then missed the others' caption files)
    import multiprocessing
    import os

    from vlpcache import workspace as workspace_module

    roots, read_together = [tmp_path / f"part{i}" for i in range(4)], multiprocessing.get_context("fork").Barrier(4)

    def remember(root: Path) -> None:
        first_read = [True]
        read = workspace_module.Workspace.extracted_roots

        def read_with_the_others(self):  # every process has read the record before any writes it again
            if first_read.pop() if first_read else False:
                read_together.wait(timeout=60)
            return read(self)

        workspace_module.Workspace.extracted_roots = read_with_the_others
        Workspace(tmp_path / "ws").remember_roots([root])
        os._exit(0)

    workers = [multiprocessing.get_context("fork").Process(target=remember, args=(root,)) for root in roots]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(HANG_GUARD_S)
    assert [worker.exitcode for worker in workers] == [0] * 4
    assert sorted(Workspace(tmp_path / "ws").extracted_roots()) == sorted(str(root.resolve()) for root in roots)


def test_default_captions_train_on_the_roots_file_and_validate_on_val_jsonl_beside_it(tmp_path, cache):
    workspace, dataset = extracted_layout(tmp_path)
    data = load_pretrain_data([cache], None, None, workspace=workspace)
    assert data.caption_files == [(dataset / "train.jsonl").resolve()]
    assert data.validation_file.resolve() == (dataset / "val.jsonl").resolve()
    assert sorted(trained_captions(data)) == ["v0", "v1", "v2", "v3"]
    assert validation_captions(data) == {"v4": ["val 4"], "v5": ["val 5"]}


def test_default_captions_come_from_the_nearest_folder_that_has_some_and_a_caption_two_files_give_is_read_once(
        tmp_path, cache):
    """photos/ extracted from the project folder that holds captions.jsonl and train.jsonl (the same
    captions, whole and its train part): an unrelated table two folders up is not trained on, and each
    caption the two files both give is one caption, not two."""
    project = tmp_path / "up" / "project"
    (project / "photos").mkdir(parents=True)
    records = [{"video": f"v{i}", "captions": [f"a photo {i}", f"another {i}"]} for i in range(4)]
    write_jsonl(project / "captions.jsonl", records)
    write_jsonl(project / "train.jsonl", records[:2])
    write_jsonl(tmp_path / "up" / "unrelated.jsonl", [{"video": "v5", "captions": ["not this project's"]}])  # photos/../..
    workspace = Workspace(project / ".vlpcache")
    workspace.remember_roots([project / "photos"])
    data = load_pretrain_data([cache], None, None, workspace=workspace)
    assert data.caption_files == [(project / "captions.jsonl").resolve(), (project / "train.jsonl").resolve()]
    assert trained_captions(data) == {f"v{i}": [f"a photo {i}", f"another {i}"] for i in range(4)}
    assert data.summary()[0].endswith("; 4 captions are in more than one of them, each read once")


def test_a_caption_two_files_give_one_item_under_two_key_forms_is_read_once_and_said(tmp_path, cache):
    # `v1` in a.jsonl, `v1.mp4` in b.csv: both name the item v1, and before, its captions were trained on twice
    write_jsonl(tmp_path / "a.jsonl", [{"video": f"v{i}", "captions": [f"a photo {i}", f"another {i}"]} for i in range(3)])
    (tmp_path / "b.csv").write_text("video,caption\n" + "".join(f"v{i}.mp4,a photo {i}\nv{i}.mp4,its own {i}\n"
                                                                 for i in range(2)))
    data = load_pretrain_data([cache], [tmp_path / "a.jsonl", tmp_path / "b.csv"], None)
    assert trained_captions(data) == {"v0": ["a photo 0", "another 0", "its own 0"],
                                      "v1": ["a photo 1", "another 1", "its own 1"], "v2": ["a photo 2", "another 2"]}
    assert data.summary()[0].endswith("; 2 captions are in more than one of them, each read once")
    assert data.train_report.key_matches.by_path == [("v0.mp4", "v0"), ("v1.mp4", "v1")]


def test_lines_call_the_items_what_they_are():
    from vlpcache.report import items_word

    assert items_word(["video", "frames"]) == "videos" and items_word(["image", "image"]) == "photos"
    assert items_word(["image", "video"]) == "items" and items_word([]) == "videos"


def test_a_default_val_jsonl_whose_videos_are_not_cached_is_left_out_quietly(tmp_path, cache):
    workspace, dataset = extracted_layout(tmp_path)
    write_jsonl(dataset / "val.jsonl", [{"video": "elsewhere", "captions": ["not cached"]}])
    data = load_pretrain_data([cache], None, None, workspace=workspace)
    assert data.validation is None and data.validation_file is None


def test_caption_files_in_the_workspace_itself_are_found_and_held_out_ones_never(tmp_path):
    workspace = Workspace(tmp_path / "ws")
    workspace.root.mkdir()
    for name in ("mine.csv", "val.jsonl", "test.csv", "notes.txt"):
        (workspace.root / name).write_text("")
    assert find_caption_files(workspace) == [(workspace.root / "mine.csv").resolve()]


def test_a_file_found_by_default_that_holds_no_captions_is_left_out_with_a_note_not_an_error(tmp_path, cache):
    """eval --per-query writes its records where it is told, a .jsonl often beside the captions: pretrain
    without --captions found it and stopped on it, a file the user never named."""
    workspace = Workspace(tmp_path / "ws")
    workspace.root.mkdir()
    write_jsonl(workspace.root / "mine.jsonl", [{"video": f"v{i}", "captions": [f"caption {i}"]} for i in range(4)])
    records = write_jsonl(workspace.root / "a.jsonl", [{"query": "a dog", "rank": 3}, {"query": "a cat", "rank": 1}])
    data = load_pretrain_data([cache], None, None, workspace=workspace)
    assert sorted(trained_captions(data)) == ["v0", "v1", "v2", "v3"]
    [note] = [line for line in data.summary() if line.startswith("note: ")]
    assert note.startswith(f"note: {records}: no caption could be read (2 unreadable, the first: line 1: ")
    assert note.endswith("it was found by default, as a .jsonl or .csv file beside the extracted roots or in the "
                         "workspace: left out (pass --captions FILE to say which to train on)")
    with pytest.raises(UserError, match=r"a\.jsonl: no caption could be read"):  # named: its error stands
        load_pretrain_data([cache], [records], None, workspace=workspace)


def test_captions_naming_images_of_a_folder_cached_as_one_item_say_to_extract_with_no_frame_folders(tmp_path):
    photos = tmp_path / "photos"  # a folder of photos, extracted without --no-frame-folders: one item
    photos.mkdir()
    write_cache(tmp_path / "cache", 1, prefix="photos", sources=[(photos, "frames")])
    train = tmp_path / "train.csv"
    train.write_text("video,caption\n1000268201_693b08cb0e.jpg,a child climbs the stairs\n")
    with pytest.raises(UserError, match=r"caption ids like '1000268201_693b08cb0e\.jpg'\); the captions name images, "
                                        r"and 'photos0' is a frames folder, cached as one item \(a video's frames\): to "
                                        r"cache each image as an item, extract it again into a new cache with "
                                        r"--no-frame-folders$"):
        load_pretrain_data([tmp_path / "cache"], [train], None, workspace=Workspace(tmp_path / "ws"))
    # the dataset's own ids, without the extension: the images' names in the folder say so
    (photos / "1000268201_693b08cb0e.jpg").write_bytes(b"")
    train.write_text("video,caption\n1000268201_693b08cb0e,a child climbs the stairs\n")
    with pytest.raises(UserError, match=r"'photos0' is a frames folder, cached as one item"):
        load_pretrain_data([tmp_path / "cache"], [train], None, workspace=Workspace(tmp_path / "ws"))


def test_validation_videos_with_training_captions_are_refused_naming_one(tmp_path, cache):
    train = write_jsonl(tmp_path / "train.jsonl", [{"video": f"v{i}", "captions": ["x"]} for i in range(4)])
    val = write_jsonl(tmp_path / "val.jsonl", [{"video": "v3", "captions": ["y"]}, {"video": "v4", "captions": ["z"]}])
    with pytest.raises(UserError, match=r"val\.jsonl: 1 validation videos also have training captions \(e\.g\. 'v3'\)"):
        load_pretrain_data([cache], [train], val, workspace=Workspace(tmp_path / "ws"))


def test_caches_whose_features_differ_never_mix_and_an_id_in_two_caches_is_trained_once(tmp_path, cache):
    write_cache(tmp_path / "wider", 2, dim=32)
    train = write_jsonl(tmp_path / "train.jsonl", [{"video": f"v{i}", "captions": [f"caption {i}"]} for i in range(6)])
    with pytest.raises(UserError, match=r"wider: its features are not comparable with .*feature_dim: 16 != 32"):
        load_pretrain_data([cache, tmp_path / "wider"], [train], None, workspace=Workspace(tmp_path / "ws"))
    write_cache(tmp_path / "again", 3, seed=7)  # v0, v1, v2 once more
    data = load_pretrain_data([cache, tmp_path / "again"], [train], None, workspace=Workspace(tmp_path / "ws"))
    assert sorted(trained_captions(data)) == [f"v{i}" for i in range(6)]
    assert {c for c, _, _ in data.train.samples} == {0} and data.train_report.duplicate_ids == 3  # the first cache's


def test_a_caption_naming_its_video_by_file_name_or_path_trains_and_validates_on_that_item(tmp_path, cache):
    csv = tmp_path / "train.csv"
    csv.write_text("video,caption\nv0.mp4,a dog\n/data/videos/v1.avi,a cat\nvideos\\v2.mp4,a bird\nv3,a fish\n"
                   "v3.mp4,the fish again\nv9.mp4,not extracted\n")
    val = write_jsonl(tmp_path / "val.jsonl", [{"video": "clips/v5.webm", "captions": ["a horse"]}])
    data = load_pretrain_data([cache], [csv], val, workspace=Workspace(tmp_path / "ws"))
    assert trained_captions(data) == {"v0": ["a dog"], "v1": ["a cat"], "v2": ["a bird"], "v3": ["a fish", "the fish again"]}
    assert validation_captions(data) == {"v5": ["a horse"]}
    line = data.train_report.line()
    assert "4 items with captions" in line and "1 captioned ids not in the cache(s) (e.g. 'v9.mp4')" in line
    assert "4 caption ids name their video by file name or path (e.g. 'v0.mp4' for 'v0')" in line


def test_a_caption_id_in_another_unicode_form_or_with_spaces_around_names_its_video(tmp_path):
    """macOS writes file names decomposed (NFD: `e` and a combining accent), people type them composed;
    a spreadsheet keeps the spaces typed around an id. Both name their video, said with an example."""
    import unicodedata

    decomposed = unicodedata.normalize("NFD", "clips/téléphone")
    write_cache(tmp_path / "cache", 3, prefix="clips/v")  # clips/v0..v2
    with ShardWriter(tmp_path / "cache", RegionCache(tmp_path / "cache").settings, writer_name="s0of2") as writer:
        writer.add(decomposed, f"/data/{decomposed}.mp4", "video", RegionCache(tmp_path / "cache").get("clips/v0"))
    csv = tmp_path / "train.csv"
    csv.write_text("video,caption\n  clips/v1.mp4 ,a cat\nclips/téléphone.mp4,a phone rings\nclips/v2,a bird\n"
                   "nowhere.mp4,not extracted\n")
    data = load_pretrain_data([tmp_path / "cache"], [csv], None, workspace=Workspace(tmp_path / "ws"))
    assert trained_captions(data) == {"clips/v1": ["a cat"], decomposed: ["a phone rings"], "clips/v2": ["a bird"]}
    line = data.train_report.line()
    assert "3 items with captions" in line and "1 captioned ids not in the cache(s) (e.g. 'nowhere.mp4')" in line
    assert ("2 caption ids name their video in another Unicode form or with spaces around it (e.g. '  clips/v1.mp4 ' "
            "for 'clips/v1')") in line


def test_the_end_of_an_id_in_another_unicode_form_or_with_spaces_around_names_its_video():
    """A folder of splits made on macOS (ids `train/<NFD name>`) and a caption file that names each video by its
    own name, typed composed or with spaces around it: each names its video by the end of its id, as a whole id
    or path in another form does."""
    import unicodedata

    decomposed = unicodedata.normalize("NFD", "train/téléphone")
    ids = [decomposed, "train/v1", "test/v2", "a/twice", "b/twice"]
    keys = {unicodedata.normalize("NFC", "téléphone"): ["a phone rings"], " v1 ": ["a cat"], "v2.mp4 ": ["a bird"],
            " twice": ["either"], "nowhere": ["none"]}
    matched, matches = Captions(dict(keys)).matched_to(ids)
    assert matched.by_id == {decomposed: ["a phone rings"], "train/v1": ["a cat"], "test/v2": ["a bird"],
                             " twice": ["either"], "nowhere": ["none"]}
    assert matches.by_tail == [("téléphone", decomposed), (" v1 ", "train/v1"), ("v2.mp4 ", "test/v2")]
    assert matches.ambiguous == [(" twice", ["a/twice", "b/twice"])]


def test_an_item_named_by_a_key_wins_over_a_shorter_tail_and_a_key_naming_none_stays():
    from vlpcache.captions import item_named_by

    ids = {"clips/a", "a", "b.v2", "x/y"}
    assert item_named_by("clips/a.mp4", ids) == "clips/a" and item_named_by("a.mp4", ids) == "a"
    assert item_named_by("/data/clips/a.mp4", ids) == "clips/a" and item_named_by("clips\\a.mp4", ids) == "clips/a"
    assert item_named_by("./b.v2.mp4", ids) == "b.v2" and item_named_by("data/x/y.avi", ids) == "x/y"
    assert item_named_by("y.avi", ids) is None and item_named_by("zz.mp4", ids) is None and item_named_by("/", ids) is None
    assert item_named_by("a.jpg,A", ids) is None  # a line of a CSV misread: ".jpg,A" is no file's extension


def test_a_caption_keyed_by_the_end_of_one_item_id_trains_on_it_and_one_ending_several_ids_is_named(tmp_path):
    """A folder of splits extracted as one root has ids `train/v1`; its caption files say `v1`."""
    write_cache(tmp_path / "splits", 4, prefix="train/v")  # train/v0..v3
    write_cache(tmp_path / "val", 2, prefix="val/w")  # val/w0, val/w1
    write_cache(tmp_path / "other", 1, prefix="other/v")  # other/v0: `v0` now ends two ids
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"video": "v2", "captions": ["two"]}, {"video": "v3.mp4", "captions": ["three"]},
        {"video": "train/v1", "captions": ["one"]}, {"video": "v0", "captions": ["zero?"]},
        {"video": "v9", "captions": ["not extracted"]},
    ])
    val = write_jsonl(tmp_path / "val.jsonl", [{"video": "w1", "captions": ["val one"]}])
    caches = [tmp_path / "splits", tmp_path / "val", tmp_path / "other"]
    data = load_pretrain_data(caches, [train], val, workspace=Workspace(tmp_path / "ws"))
    assert trained_captions(data) == {"train/v1": ["one"], "train/v2": ["two"], "train/v3": ["three"]}
    assert validation_captions(data) == {"val/w1": ["val one"]}
    line = data.train_report.line()
    assert "3 items with captions" in line and "2 captioned ids not in the cache(s)" in line  # v0 and v9
    assert "2 caption ids name their video by the end of its id (e.g. 'v2' for 'train/v2')" in line
    assert ("1 caption id ends several item ids and matches none (e.g. 'v0': 'train/v0', 'other/v0'): name that "
            "video by its whole id") in line
    assert data.summary()[-1] == (f"validation ({val}): 1 videos, 1 captions as queries, 1 caption id names its video "
                                  "by the end of its id (e.g. 'w1' for 'val/w1')")

    only_ambiguous = write_jsonl(tmp_path / "v0.jsonl", [{"video": "v0", "captions": ["zero?"]}])
    with pytest.raises(UserError, match=r"no cached item has a caption .* 1 caption id ends several item ids"):
        load_pretrain_data(caches, [only_ambiguous], None, workspace=Workspace(tmp_path / "ws"))


def test_the_end_of_an_id_matches_whole_path_components_with_or_without_the_extension():
    from vlpcache.captions import ItemTails

    tails = ItemTails(["a/b/clip", "x/clip2", "y/clip2", "deep/er/one.v2"])
    assert tails.item_ending_in("clip") == ("a/b/clip", []) and tails.item_ending_in("b/clip.mp4") == ("a/b/clip", [])
    assert tails.item_ending_in("lip") == (None, []) and tails.item_ending_in("a/b/clip") == (None, [])  # whole ids are not tails
    assert tails.item_ending_in("clip2.avi") == (None, ["x/clip2", "y/clip2"])
    assert tails.item_ending_in("er\\one.v2.webm") == ("deep/er/one.v2", []) and tails.item_ending_in("./") == (None, [])


def test_half_an_emoji_escaped_alone_in_json_reads_as_a_replacement_character_the_tokenizer_takes(tmp_path):
    from transformers import AutoTokenizer
    from vlpcache.model.model import default_text_model

    # a scraper that cut its captions at N UTF-16 units wrote the first half of "🐶" (\ud83d\udc36) alone
    path = tmp_path / "c.jsonl"
    path.write_text('{"video": "v0", "captions": ["a dog runs \\ud83d", "\\udc36 a cat", "a \\ud83d\\udc36 dog"]}\n')
    captions = read_captions(path).by_id
    assert captions == {"v0": ["a dog runs \ufffd", "\ufffd a cat", "a 🐶 dog"]}  # a whole pair stays itself
    tokenizer = AutoTokenizer.from_pretrained(default_text_model())
    assert [len(ids) for ids in tokenizer(captions["v0"])["input_ids"]] == [5, 4, 5]  # BERT's cleaning drops U+FFFD


def test_a_line_separator_or_form_feed_inside_a_caption_neither_splits_it_nor_joins_its_words(tmp_path):
    from transformers import AutoTokenizer
    from vlpcache.model.model import default_text_model

    # web alt-text with a U+2028, cp1252's "…" read as Latin-1 (U+0085), a form feed: str.splitlines ends a
    # line at each, and BERT's tokenizer drops the last two, joining "view" and "of"
    folder = tmp_path / "cc3m" / "00000"
    folder.mkdir(parents=True)
    (folder / "000000000.jpg").write_bytes(b"")
    (folder / "000000000.txt").write_text("a great view\x85of the city\u2028at night\r\na second\x0ccaption\r\n",
                                          encoding="utf-8", newline="")
    (tmp_path / "Flickr8k.token.txt").write_text("1000268201_693b08cb0e.jpg#0\ta dog\u2028runs\x85home\n",
                                                 encoding="utf-8", newline="")
    folder_captions = read_captions(tmp_path / "cc3m").by_id
    token_captions = read_captions(tmp_path / "Flickr8k.token.txt").by_id
    assert folder_captions == {"00000/000000000": ["a great view of the city\u2028at night", "a second caption"]}
    assert token_captions == {"1000268201_693b08cb0e.jpg": ["a dog\u2028runs home"]}  # matched to an item later
    tokenizer = AutoTokenizer.from_pretrained(default_text_model())
    assert tokenizer.tokenize(folder_captions["00000/000000000"][0]) == "a great view of the city at night".split()


def test_html_character_references_and_formatting_tags_in_scraped_captions_are_not_read_as_words(tmp_path):
    from transformers import AutoTokenizer
    from vlpcache.model.model import default_text_model

    lines = ["Tom &amp; Jerry fight", "it&#39;s a &quot;dog&quot;", "it&#x27;s", "a dog&lt;br&gt;runs",
             "<b>dog</b> runs", "a cat<br/>sits", "R&B and AT&T &copy 2020 &ampfoo; &foo;", "a < b and x<y>z tlc>"]
    (tmp_path / "c.csv").write_text("video,caption\n" + "".join(f'v0,"{c.replace(chr(34), 2 * chr(34))}"\n' for c in lines),
                                    encoding="utf-8")
    captions = read_captions(tmp_path / "c.csv").by_id["v0"]
    assert captions == ["Tom & Jerry fight", 'it\'s a "dog"', "it's", "a dog runs", "dog runs", "a cat sits",
                        "R&B and AT&T &copy 2020 &ampfoo; &foo;", "a < b and x<y>z tlc>"]  # literal text as typed
    tokenizer = AutoTokenizer.from_pretrained(default_text_model())
    assert tokenizer.tokenize(captions[0]) == ["tom", "&", "jerry", "fight"]  # no "amp"


def test_a_zero_width_space_or_byte_order_mark_parts_words_and_the_joiners_stay_inside_their_word(tmp_path):
    from transformers import AutoTokenizer
    from vlpcache.model.model import default_text_model

    # web text breaks lines with U+200B; U+FEFF is a BOM of joined texts: BERT's tokenizer drops both, joining
    # "dog" and "runs"; U+200C, U+200D and U+2060 join by design (Persian, emoji, a word joiner): dropped still
    lines = ["a dog\u200bruns", "a cat\ufeffsits", "a man\u200dwalks", "a man\u2060walks", "a man\u200cwalks"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"video": "v0", "captions": lines}) + "\n", encoding="utf-8")
    captions = read_captions(tmp_path / "c.jsonl").by_id["v0"]
    tokenizer = AutoTokenizer.from_pretrained(default_text_model())
    assert [tokenizer.tokenize(c) for c in captions[:2]] == [["a", "dog", "runs"], ["a", "cat", "sits"]]
    assert len({tuple(tokenizer.tokenize(c)) for c in captions[2:]}) == 1  # "manwalks", as the tokenizer reads it


def test_files_joined_with_cat_read_whole_though_each_began_with_a_byte_order_mark(tmp_path):
    # `cat part-*.jsonl > all.jsonl` of files a Windows tool saved with a BOM: one in the middle of a line's start
    parts = [('{"video": "v%d", "captions": ["a dog %d"]}\n' % (i, i)).encode("utf-8-sig") for i in range(3)]
    (tmp_path / "all.jsonl").write_bytes(b"".join(parts))
    captions = read_captions(tmp_path / "all.jsonl")
    assert captions.by_id == {"v0": ["a dog 0"], "v1": ["a dog 1"], "v2": ["a dog 2"]} and captions.bad_lines == 0
    lines = [f"100{i}_a.jpg#0\ta cat {i}\n".encode("utf-8-sig") for i in range(2)]  # Flickr8k.token.txt's form
    (tmp_path / "all.token.txt").write_bytes(b"".join(lines))
    assert read_captions(tmp_path / "all.token.txt").by_id == {"1000_a.jpg": ["a cat 0"], "1001_a.jpg": ["a cat 1"]}


def test_a_caption_of_megabytes_is_cut_to_ten_thousand_characters_and_said(tmp_path):
    # a 100 MB line (a log mistaken for captions) was tokenized whole by pretrain and eval: 22 GB, then killed
    from vlpcache.captions import CAPTION_MAX_CHARS

    path = tmp_path / "caps.jsonl"
    long = "a dog runs " * 200_000
    path.write_text(json.dumps({"video": "v1", "captions": [long, "a cat sleeps"]}) + "\n"
                    + json.dumps({"video": "v2", "caption": "x" * 3_000_000}) + "\n")
    captions = read_captions(path)
    assert captions.by_id["v1"] == [long[:CAPTION_MAX_CHARS].strip(), "a cat sleeps"]
    assert captions.by_id["v2"] == ["x" * CAPTION_MAX_CHARS] and captions.cut == 2
    assert captions.bad_lines_text() == ", 2 captions over 10,000 characters cut to their first 10,000"
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"video": "v3", "caption": "y" * 20_000}) + "\n{not json\n")
    merged = read_captions(path).merge(read_captions(other))
    assert merged.cut == 3 and merged.bad_lines_text().endswith(
        "), 3 captions over 10,000 characters cut to their first 10,000")
