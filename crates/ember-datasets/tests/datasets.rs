//! ember-datasets end to end: the seed's ChnSentiCorp sequence on the real file, the round trip
//! with Python `datasets` both ways, and typed errors on bad input.

use ember_datasets::arrow::array::{ArrayRef, Int64Array};
use ember_datasets::{
    read_csv, Dataset, DatasetDict, DatasetError, Feature, SplitOptions, SplitSize,
};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/datasets")
}

fn shared() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared");
    if dir.join("data").is_dir() {
        Some(dir)
    } else {
        eprintln!("SKIP: shared data folder {} is absent", dir.display());
        None
    }
}

fn rows_json(ds: &Dataset) -> Value {
    Value::Array(
        ds.to_json_rows()
            .unwrap()
            .into_iter()
            .map(Value::Object)
            .collect(),
    )
}

#[test]
fn chnsenticorp_load_filter_stratified_split_save_load() {
    let Some(shared) = shared() else { return };
    let ds = read_csv(shared.join("data/chnsenticorp/ChnSentiCorp_htl_all.csv")).unwrap();
    assert_eq!(ds.num_rows(), 7766);
    assert_eq!(ds.column_names(), ["label", "review"]);
    assert_eq!(
        ds.features().get("label"),
        Some(&Feature::Value("int64".into()))
    );
    assert_eq!(
        ds.features().get("review"),
        Some(&Feature::Value("large_string".into()))
    );
    // The one empty review is a null (index 6374, as Python `datasets` reads it), kept until filtered.
    let reviews = ds.string_column("review").unwrap();
    let nulls: Vec<usize> = reviews
        .iter()
        .enumerate()
        .filter(|(_, r)| r.is_none())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(nulls, [6374]);
    assert!(ds.row(6374).unwrap()["review"].is_null());

    let ds = ds.filter(|row| !row["review"].is_null()).unwrap();
    assert_eq!(ds.num_rows(), 7765);
    let ds = ds.class_encode_column("label").unwrap();
    assert_eq!(
        ds.features().get("label"),
        Some(&Feature::ClassLabel(vec!["0".into(), "1".into()]))
    );

    let opts = SplitOptions {
        test_size: Some(SplitSize::Fraction(0.1)),
        stratify_by_column: Some("label".into()),
        seed: 42,
        ..Default::default()
    };
    let splits = ds.train_test_split(&opts).unwrap();
    let (train, test) = (
        splits.split("train").unwrap(),
        splits.split("test").unwrap(),
    );
    assert_eq!(
        (train.num_rows(), test.num_rows()),
        (6988, 777),
        "HF sizes: ceil(0.1 n), the rest"
    );
    let positives = |d: &Dataset| {
        d.int_column("label")
            .unwrap()
            .iter()
            .filter(|l| **l == Some(1))
            .count()
    };
    let all = positives(&ds) as f64 / ds.num_rows() as f64;
    for d in [train, test] {
        let p = positives(d) as f64 / d.num_rows() as f64;
        assert!(
            (p - all).abs() <= 1.0 / d.num_rows() as f64,
            "class proportion {p} vs {all}"
        );
    }
    assert_eq!(positives(train) + positives(test), positives(&ds));

    let dir = tempfile::tempdir().unwrap();
    splits.save_to_disk(dir.path().join("split")).unwrap();
    let back = DatasetDict::load_from_disk(dir.path().join("split")).unwrap();
    assert_eq!(back.split("test").unwrap().num_rows(), 777);
    assert_eq!(back.split("train").unwrap().features(), train.features());
    assert_eq!(rows_json(back.split("test").unwrap()), rows_json(test));
}

#[test]
fn loads_what_python_saved() {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
            .unwrap();
    let ds = Dataset::load_from_disk(fixtures().join("python-saved/single")).unwrap();
    assert_eq!(rows_json(&ds), expected["rows"]);
    assert_eq!(ds.features().to_json(), expected["features"]);
    assert!(ds.row(2).unwrap()["text"].is_null(), "nulls stay nulls");
    let dd = DatasetDict::load_from_disk(fixtures().join("python-saved/dict")).unwrap();
    let names: Vec<&str> = dd.splits.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["train", "test"]);
    for (name, d) in &dd.splits {
        assert_eq!(rows_json(d), expected["dict"][name], "split {name}");
    }
}

#[test]
fn python_loads_what_ember_saved() {
    let Some(python) = ember_testkit::reference_python() else {
        return;
    };
    // Built in Ember (not copied from the Python fixture), then saved.
    let ds = Dataset::from_json_rows(&[
        serde_json::json!({"text": "a clean room", "label": 1, "tags": [1, 2], "score": 0.5}),
        serde_json::json!({"text": null, "label": 0, "tags": [], "score": -2.0}),
        serde_json::json!({"text": "早餐", "label": 1, "tags": [3], "score": 1.0}),
    ])
    .unwrap()
    .cast_column(
        "label",
        Feature::ClassLabel(vec!["negative".into(), "positive".into()]),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    ds.save_to_disk(dir.path().join("single")).unwrap();
    let mut dd = DatasetDict::default();
    dd.insert("train", ds.select(&[0, 1]).unwrap());
    dd.insert("test", ds.select(&[2]).unwrap());
    dd.save_to_disk(dir.path().join("dict")).unwrap();
    let request = serde_json::json!({
        "single": dir.path().join("single"),
        "dict": dir.path().join("dict"),
        "rows": rows_json(&ds),
        "features": ds.features().to_json(),
        "dict_rows": {"train": rows_json(dd.split("train").unwrap()), "test": rows_json(dd.split("test").unwrap())},
    });
    let mut child = std::process::Command::new(python)
        .arg(fixtures().join("check_ember_saved.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn batched_map_adds_and_removes_columns() {
    let ds = Dataset::from_json_rows(&[
        serde_json::json!({"text": "a b c", "label": 1}),
        serde_json::json!({"text": "d", "label": 0}),
        serde_json::json!({"text": "e f", "label": 1}),
    ])
    .unwrap();
    let mapped = ds
        .map_batched(2, &["text"], |batch| {
            let lens: Vec<i64> = batch
                .string_column("text")?
                .iter()
                .map(|t| t.as_deref().unwrap_or("").split(' ').count() as i64)
                .collect();
            Ok(vec![(
                "n_words".to_string(),
                Arc::new(Int64Array::from(lens)) as ArrayRef,
            )])
        })
        .unwrap();
    assert_eq!(mapped.column_names(), ["label", "n_words"]);
    assert_eq!(
        mapped.int_column("n_words").unwrap(),
        [Some(3), Some(1), Some(2)]
    );
    let err = ds.map_batched(2, &[], |_| {
        Ok(vec![(
            "x".to_string(),
            Arc::new(Int64Array::from(vec![1])) as ArrayRef,
        )])
    });
    assert!(matches!(err, Err(DatasetError::Shape(_))));
}

#[test]
fn bad_input_gives_typed_errors_naming_the_culprit() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.csv");
    std::fs::write(&empty, "").unwrap();
    assert!(matches!(read_csv(&empty), Err(DatasetError::EmptyFile(p)) if p == empty));

    let ragged = dir.path().join("ragged.csv");
    std::fs::write(&ragged, "a,b\n1,2\n3\n4,5\n").unwrap();
    let err = read_csv(&ragged).unwrap_err();
    assert!(err.to_string().contains("ragged.csv"), "{err}");

    let ds = Dataset::from_json_rows(&[
        serde_json::json!({"label": 0}),
        serde_json::json!({"label": 2}),
    ])
    .unwrap();
    let err = ds.column("nope").unwrap_err();
    assert!(
        matches!(err, DatasetError::MissingColumn { ref name, .. } if name == "nope"),
        "{err}"
    );
    let err = ds
        .cast_column("label", Feature::ClassLabel(vec!["a".into(), "b".into()]))
        .unwrap_err();
    assert!(
        matches!(err, DatasetError::LabelOutOfRange { row: 1, ref value, .. } if value == "2"),
        "{err}"
    );
    for bad in [
        SplitSize::Fraction(1.5),
        SplitSize::Fraction(0.0),
        SplitSize::Count(2),
    ] {
        let opts = SplitOptions {
            test_size: Some(bad),
            ..Default::default()
        };
        assert!(matches!(
            ds.train_test_split(&opts),
            Err(DatasetError::InvalidArgument {
                name: "test_size",
                ..
            })
        ));
    }
    let opts = SplitOptions {
        stratify_by_column: Some("label".into()),
        ..Default::default()
    };
    assert!(
        matches!(
            ds.train_test_split(&opts),
            Err(DatasetError::ColumnType { .. })
        ),
        "needs a ClassLabel"
    );

    // A corrupted Arrow file names the file; the save it came from is untouched by a failed one.
    let saved = dir.path().join("saved");
    ds.save_to_disk(&saved).unwrap();
    let arrow_file = saved.join("data-00000-of-00001.arrow");
    let bytes = std::fs::read(&arrow_file).unwrap();
    std::fs::write(&arrow_file, &bytes[..bytes.len() / 2]).unwrap();
    let err = Dataset::load_from_disk(&saved).unwrap_err();
    assert!(
        err.to_string().contains("data-00000-of-00001.arrow"),
        "{err}"
    );
}

#[test]
fn select_shuffle_sort_unique_rename() {
    let ds = Dataset::from_json_rows(&[
        serde_json::json!({"t": "b", "n": 2}),
        serde_json::json!({"t": "a", "n": 1}),
        serde_json::json!({"t": "b", "n": 3}),
    ])
    .unwrap();
    assert_eq!(
        ds.select(&[2, 0]).unwrap().int_column("n").unwrap(),
        [Some(3), Some(2)]
    );
    assert!(matches!(
        ds.select(&[3]),
        Err(DatasetError::IndexOutOfRange { index: 3, len: 3 })
    ));
    let shuffled = ds.shuffle(7).unwrap();
    let mut ns = shuffled.int_column("n").unwrap();
    ns.sort();
    assert_eq!(ns, [Some(1), Some(2), Some(3)]);
    assert_eq!(
        ds.shuffle(7).unwrap().int_column("n").unwrap(),
        shuffled.int_column("n").unwrap()
    );
    assert_eq!(
        ds.sort("n", false).unwrap().string_column("t").unwrap()[0].as_deref(),
        Some("a")
    );
    assert_eq!(
        ds.unique("t").unwrap(),
        [Value::from("b"), Value::from("a")]
    );
    let renamed = ds.rename_column("t", "text").unwrap();
    assert_eq!(renamed.column_names(), ["text", "n"]);
    assert!(matches!(
        ds.rename_column("t", "n"),
        Err(DatasetError::DuplicateColumn(_))
    ));
}

#[test]
fn split_expressions_slice_like_python() {
    let Some(shared) = shared() else { return };
    let file = shared.join("data/chnsenticorp/ChnSentiCorp_htl_all.csv");
    // Row counts Python `datasets` 5.2 gives for the same expressions on this file.
    for (expr, rows) in [
        ("train", 7766),
        ("train[:10%]", 777),
        ("train[-10%:]", 777),
        ("train[10:100]", 90),
        ("train[:10%]+train[-5:]", 782),
        ("train[33%:34%]", 77),
    ] {
        let ds = ember_datasets::load_dataset_split("csv", &file, expr).unwrap();
        assert_eq!(ds.num_rows(), rows, "{expr}");
    }
    let first = ember_datasets::load_dataset_split("csv", &file, "train[10:12]").unwrap();
    let all = read_csv(&file).unwrap();
    assert_eq!(rows_json(&first), rows_json(&all.slice(10, 2).unwrap()));
    for bad in ["train[", "train[a:b]", "train[:200%]", "", "train+"] {
        let err = ember_datasets::load_dataset_split("csv", &file, bad).unwrap_err();
        assert!(
            matches!(err, DatasetError::InvalidArgument { name: "split", .. }),
            "{bad}: {err}"
        );
    }
    let err = ember_datasets::load_dataset_split("csv", &file, "validation").unwrap_err();
    assert!(err.to_string().contains("validation"), "{err}");
}

#[test]
fn conll_and_msra_ner_files_read_into_tokens_and_tag_ids() {
    let Some(shared) = shared() else { return };
    let conll = ember_datasets::read_conll(shared.join("data/ner/conll2003/train.txt")).unwrap();
    assert_eq!(conll.num_rows(), 14041);
    let Some(Feature::List(inner)) = conll.features().get("ner_tags") else {
        panic!()
    };
    let Feature::ClassLabel(names) = inner.as_ref() else {
        panic!()
    };
    assert_eq!(
        names,
        &["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    );
    let row = conll.row(0).unwrap();
    assert_eq!(row["tokens"][0], "EU");
    assert_eq!(row["ner_tags"][0], 5, "EU is B-ORG");

    let msra = ember_datasets::read_conll(shared.join("data/ner/msra/test.txt")).unwrap();
    assert_eq!(msra.num_rows(), 4631);
    let pd = ember_datasets::read_conll(shared.join("data/ner/peoples_daily/example.dev")).unwrap();
    assert_eq!(pd.num_rows(), 2318);

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, "EU B-ORG\nrejects\n").unwrap();
    let err = ember_datasets::read_conll(&bad).unwrap_err();
    assert!(err.to_string().contains("line 2"), "{err}");
    let small = dir.path().join("small.txt");
    std::fs::write(&small, "EU B-ORG\n\nParis B-LOC\n").unwrap();
    let err =
        ember_datasets::read_conll_with_labels(&small, &["O".into(), "B-ORG".into()]).unwrap_err();
    assert!(
        matches!(err, DatasetError::LabelOutOfRange { row: 1, ref value, .. } if value == "B-LOC"),
        "{err}"
    );
}

#[test]
fn json_parquet_and_csv_exports_round_trip() {
    let ds = Dataset::load_from_disk(fixtures().join("python-saved/single")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pq = dir.path().join("data.parquet");
    ds.to_parquet(&pq).unwrap();
    let back = ember_datasets::read_parquet(&pq).unwrap();
    assert_eq!(rows_json(&back), rows_json(&ds));
    assert_eq!(
        back.features(),
        ds.features(),
        "ClassLabel survives through the schema metadata"
    );

    let jl = dir.path().join("data.jsonl");
    ds.to_json_lines(&jl).unwrap();
    let back = ember_datasets::read_json(&jl).unwrap();
    assert_eq!(back.num_rows(), ds.num_rows());
    assert!(back.row(2).unwrap()["text"].is_null());

    let csv = dir.path().join("data.csv");
    ds.select_columns(&["text", "label", "score"])
        .unwrap()
        .to_csv(&csv)
        .unwrap();
    let back = read_csv(&csv).unwrap();
    assert_eq!(
        back.int_column("label").unwrap(),
        ds.int_column("label").unwrap()
    );

    let dd = ember_datasets::load_dataset(
        "json",
        ember_datasets::DataFiles::Splits(vec![
            ("train".into(), vec![jl.clone(), jl.clone()]),
            ("test".into(), vec![jl]),
        ]),
    )
    .unwrap();
    assert_eq!(
        dd.split("train").unwrap().num_rows(),
        12,
        "several files concatenate"
    );
    assert_eq!(dd.split("test").unwrap().num_rows(), 6);
    let err = ember_datasets::read_parquet(&csv).unwrap_err();
    assert!(err.to_string().contains("data.csv"), "{err}");
}
