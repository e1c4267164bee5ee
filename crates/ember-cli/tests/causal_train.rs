//! `ember train --task causal-lm` from outside: the tiny Llama (GQA) fixture with a chat template
//! and the tiny GPT-2 fixture with the Human / Assistant recipe and with plain text each train a
//! few steps (finite losses, decreasing for the Llama), and the saved folder loads back; bad
//! data is an error line naming the file, the row and the field. The fixtures ship no
//! tokenizer, so each test writes a character-level one small enough for their vocabularies.
//! With the real SmolLM2 (skipped when absent), its tokenizer formats real alpaca rows.

mod common;

use serde_json::{json, Value};

use common::{losses, model_folder, train, write_alpaca, write_args, CHATML};

#[test]
fn llama_with_a_chat_template_learns_and_saves_a_loadable_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_folder(tmp.path(), "tiny-llama-gqa", Some(CHATML));
    let (data, args, out) = (
        tmp.path().join("sft.json"),
        tmp.path().join("args.json"),
        tmp.path().join("out"),
    );
    write_alpaca(&data, 8);
    write_args(&args, json!({"num_train_epochs": 5}));
    let (lines, summary) = train(&[
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--args",
        args.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
    ]);
    let losses = losses(&lines);
    assert_eq!(losses.len(), 10, "one log entry per step: {lines:?}");
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert!(
        losses[losses.len() - 1] < losses[0] * 0.8,
        "the loss falls: {losses:?}"
    );
    assert!(summary["train_loss"].as_f64().unwrap().is_finite());
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(out.join(file).is_file(), "{file}");
    }
    let reloaded = ember::models::AutoModelForCausalLM::from_pretrained::<ember::Backend>(
        &out,
        &Default::default(),
    )
    .unwrap();
    assert_eq!(reloaded.class_name(), "LlamaForCausalLM");
    let tokenizer = ember::tokenizers::AutoTokenizer::from_pretrained(&out).unwrap();
    assert!(tokenizer.chat_template().is_some(), "the template is saved");
}

#[test]
fn gpt2_trains_on_human_assistant_rows_and_on_plain_text_with_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_folder(tmp.path(), "tiny-gpt2", None);
    let (data, args) = (tmp.path().join("sft.jsonl"), tmp.path().join("args.toml"));
    let rows: String = ["hi.", "hello.", "hey!", "hi.", "hello.", "hey!"]
        .iter()
        .map(|out| format!("{}\n", json!({"instruction": "say hi.", "output": out})))
        .collect();
    std::fs::write(&data, rows).unwrap();
    std::fs::write(
        &args,
        "output_dir = \"unused\"\nmax_steps = 2\nper_device_train_batch_size = 3\n\
         logging_steps = 1.0\nsave_strategy = \"no\"\ndisable_tqdm = true\n",
    )
    .unwrap();
    let out = tmp.path().join("out-sft");
    let (lines, _) = train(&[
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--args",
        args.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--max-length",
        "40",
    ]);
    let losses = losses(&lines);
    assert_eq!(losses.len(), 2, "{lines:?}");
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert!(out.join("model.safetensors").is_file());

    let text = tmp.path().join("text.csv");
    std::fs::write(
        &text,
        "body\nthe cat sat on the mat.\na dog ran.\nthe sun is up!\nhello there.\n",
    )
    .unwrap();
    let out = tmp.path().join("out-text");
    let (lines, summary) = train(&[
        "--model",
        model.to_str().unwrap(),
        "--data",
        text.to_str().unwrap(),
        "--eval-data",
        text.to_str().unwrap(),
        "--text-column",
        "body",
        "--args",
        args.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
    ]);
    assert!(losses_finite(&lines));
    let eval = summary["eval_loss"].as_f64().unwrap();
    assert!(eval.is_finite() && eval > 0.0, "{summary}");
    let perplexity = summary["eval_perplexity"].as_f64().unwrap();
    assert!(
        (perplexity - eval.exp()).abs() < 1e-6 * perplexity,
        "{summary}"
    );
    let reloaded = ember::models::AutoModelForCausalLM::from_pretrained::<ember::Backend>(
        &out,
        &Default::default(),
    )
    .unwrap();
    assert_eq!(reloaded.class_name(), "GPT2LMHeadModel");
}

fn losses_finite(lines: &[Value]) -> bool {
    let l = losses(lines);
    !l.is_empty() && l.iter().all(|v| v.is_finite())
}

#[test]
fn bad_data_is_an_error_naming_the_file_row_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_folder(tmp.path(), "tiny-gpt2", None);
    let model = model.to_str().unwrap();
    let data = tmp.path().join("broken.json");
    std::fs::write(
        &data,
        r#"[{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d"}]"#,
    )
    .unwrap();
    let run = |extra: &[&str]| {
        let args = [
            &["train", "--task", "causal-lm", "--model", model, "--data"],
            extra,
        ]
        .concat();
        let (ok, _, stderr) = common::ember(&args, "");
        assert!(!ok);
        assert!(!stderr.contains("panicked"), "{stderr}");
        let last = stderr.trim().lines().last().unwrap_or_default().to_owned();
        assert!(last.starts_with("error: "), "{stderr}");
        last
    };
    let err = run(&[data.to_str().unwrap()]);
    assert!(
        err.contains("broken.json") && err.contains("row 1: `output` is missing"),
        "{err}"
    );
    let err = run(&[data.to_str().unwrap(), "--text-column", "body"]);
    assert!(err.contains("no column `body`"), "{err}");
    let text = tmp.path().join("text.csv");
    std::fs::write(&text, "body\nhi\n").unwrap();
    let err = run(&[text.to_str().unwrap()]);
    assert!(err.contains("no `instruction` field"), "{err}");
}

/// SmolLM2's own tokenizer and chat template on real alpaca_zh rows: the prompt tokens are the
/// ids `apply_chat_template(add_generation_prompt=True)` gives, and the response ends with the
/// template's `<|im_end|>` (skipped without SmolLM2 or the data).
#[test]
fn smollm2_formats_real_alpaca_rows_with_its_chat_template() {
    let (Some(dir), Some(path)) = (
        ember_testkit::smollm2(),
        ember_testkit::shared("data/sft/alpaca_zh_demo.json"),
    ) else {
        return;
    };
    use ember::data::{format_instruction, instruction_examples, CausalLmFormatOptions};
    use ember::tokenizers::{ChatMessage, ChatTemplateOptions};
    let tokenizer = ember::tokenizers::AutoTokenizer::from_pretrained(&dir).unwrap();
    let ds = ember::datasets::load_dataset_split("json", path, "train").unwrap();
    let rows = instruction_examples(&ds.select(&[0, 1, 2]).unwrap()).unwrap();
    let im_end = tokenizer.convert_tokens_to_ids(&["<|im_end|>"]).unwrap()[0];
    for example in &rows {
        let f = format_instruction(&tokenizer, example, &CausalLmFormatOptions::default()).unwrap();
        let prompt = tokenizer
            .apply_chat_template_ids(
                &[ChatMessage::user(example.user_turn())],
                &ChatTemplateOptions::default().add_generation_prompt(true),
            )
            .unwrap();
        assert_eq!(&f.input_ids[..prompt.len()], &prompt[..]);
        assert!(f.labels[..prompt.len()].iter().all(|&l| l == -100));
        let trained: Vec<u32> = f.labels[prompt.len()..].iter().map(|&l| l as u32).collect();
        assert!(trained.contains(&im_end), "the turn's end is trained");
    }
}
