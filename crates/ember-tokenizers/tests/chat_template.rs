//! Chat templates: `apply_chat_template` must give exactly the text and ids Python
//! `transformers` 5 gives, as `tests/fixtures/tokenizers/make_chat_fixtures.py` recorded them, on
//! templates of our own (ChatML, Llama-2 `[INST]` with `raise_exception`, tools with `tojson` and
//! loop controls) and on SmolLM2-135M-Instruct's own template; plus loading, errors and the
//! round trip through `save_pretrained`.

use ember_tokenizers::{
    AutoTokenizer, ChatMessage, ChatTemplateOptions, TokenizerError, CHAT_TEMPLATE_DIR,
    CHAT_TEMPLATE_FILE,
};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixtures() -> PathBuf {
    workspace().join("tests/fixtures/tokenizers")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixtures().join("chat-expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// `../shared` beside the checkout (or `EMBER_SHARED`); `None`, with a message, when absent.
fn shared() -> Option<PathBuf> {
    let dir = std::env::var_os("EMBER_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("../shared"));
    if dir.join("models/all-MiniLM-L6-v2").is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "SKIP: {} is absent",
            dir.join("models/all-MiniLM-L6-v2").display()
        );
        None
    }
}

fn chat_tiny() -> AutoTokenizer {
    AutoTokenizer::from_pretrained(fixtures().join("chat-tiny")).unwrap()
}

fn messages(value: &Value) -> Vec<ChatMessage> {
    serde_json::from_value(value.clone()).unwrap()
}

fn options(case: &Value) -> ChatTemplateOptions {
    let o = &case["options"];
    let mut opts = ChatTemplateOptions::default()
        .add_generation_prompt(o["add_generation_prompt"].as_bool().unwrap_or(false))
        .continue_final_message(o["continue_final_message"].as_bool().unwrap_or(false));
    if let Some(extra) = o["extra"].as_object() {
        opts.extra = extra.clone();
    }
    if let Some(tools) = o["tools"].as_array() {
        opts = opts.tools(tools.clone());
    }
    if let Some(template) = case["template"].as_str() {
        opts = opts.chat_template(template);
    }
    opts
}

/// Checks every case of one tokenizer: text and ids, or the kind (and for `raise_exception`
/// the message) of Python's error.
fn check_cases(name: &str, tok: &AutoTokenizer) -> usize {
    let expected = expected();
    let mut checked = 0;
    for case in expected["cases"].as_array().unwrap() {
        if case["tokenizer"] != name {
            continue;
        }
        let conv = case["conversation"].as_str().unwrap();
        let chat = messages(&expected["conversations"][conv]);
        let opts = options(case);
        let what = format!("{name} / {conv} / {}", case["options"]);
        let text = tok.apply_chat_template(&chat, &opts);
        let ids = tok.apply_chat_template_ids(&chat, &opts);
        match &case["error"] {
            Value::Null => {
                assert_eq!(
                    text.unwrap(),
                    case["text"].as_str().unwrap(),
                    "{what}: text"
                );
                let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
                assert_eq!(ids.unwrap(), want, "{what}: ids");
            }
            error => {
                let err = text.unwrap_err();
                let kind = error["kind"].as_str().unwrap();
                match (&err, kind) {
                    (TokenizerError::ChatTemplateRaised { message, .. }, "raised") => {
                        assert_eq!(message, error["message"].as_str().unwrap(), "{what}")
                    }
                    (TokenizerError::InvalidChat(_), "invalid") => {}
                    (TokenizerError::NoChatTemplate, "no_template") => {}
                    _ => panic!("{what}: Python raised {error}, Ember {err:?}"),
                }
                assert!(ids.is_err(), "{what}: ids despite the error");
            }
        }
        checked += 1;
    }
    assert!(checked > 0, "no cases for {name}");
    checked
}

#[test]
fn chat_tiny_templates_match_python() {
    let n = check_cases("chat-tiny", &chat_tiny());
    eprintln!("{n} chat-tiny cases match");
}

#[test]
fn minilm_with_a_template_set_in_code_matches_python() {
    let Some(shared) = shared() else { return };
    let mut tok = AutoTokenizer::from_pretrained(shared.join("models/all-MiniLM-L6-v2")).unwrap();
    assert_eq!(tok.chat_template(), None);
    check_cases("minilm", &tok);
    let chatml = expected()["templates"]["chatml"]
        .as_str()
        .unwrap()
        .to_owned();
    tok.set_chat_template(Some(&chatml));
    check_cases("minilm+chatml", &tok);
}

#[test]
fn smollm2_own_template_matches_python() {
    let Some(dir) = ember_testkit::smollm2() else {
        return;
    };
    let tok = AutoTokenizer::from_pretrained(&dir).unwrap();
    let on_disk = std::fs::read_to_string(dir.join(CHAT_TEMPLATE_FILE)).unwrap();
    assert_eq!(tok.chat_template(), Some(on_disk.as_str()));
    let n = check_cases("smollm2", &tok);
    eprintln!("{n} SmolLM2 cases match");
}

/// Small Jinja programs pin down the template language itself: Python string methods, loop
/// controls, whitespace control, `tojson`, namespaces, macros, tests and filters.
#[test]
fn jinja_programs_render_as_in_python() {
    let tok = chat_tiny();
    let chat = [ChatMessage::user("unused")];
    let expected = expected();
    let mut mismatches = Vec::new();
    for program in expected["jinja"].as_array().unwrap() {
        let template = program["template"].as_str().unwrap();
        let mut opts = ChatTemplateOptions::default().chat_template(template);
        opts.extra = program["context"].as_object().unwrap().clone();
        let got = tok.apply_chat_template(&chat, &opts);
        match (&program["output"], &program["error"], got) {
            (Value::String(want), _, Ok(got)) if *want == got => {}
            (_, Value::String(want), Err(TokenizerError::ChatTemplateRaised { message, .. }))
                if *want == message => {}
            (want, error, got) => mismatches.push(format!(
                "{template:?}\n  python: {want} {error}\n  ember:  {got:?}"
            )),
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn templates_load_from_the_config_list_and_jinja_files() {
    let tok = chat_tiny();
    let names: Vec<&str> = tok.chat_templates().keys().map(String::as_str).collect();
    assert_eq!(names, ["default", "llama2", "tools"]);
    let source = &tok.chat_templates()["llama2"].source;
    assert!(
        source.ends_with("chat-tiny/tokenizer_config.json"),
        "{source:?}"
    );

    // A `chat_template.jinja` beside the config takes priority over the config's field, and is
    // read with Python's universal newlines.
    let dir = tempfile::tempdir().unwrap();
    copy_folder(&fixtures().join("chat-tiny"), dir.path());
    std::fs::write(
        dir.path().join(CHAT_TEMPLATE_FILE),
        "{% for m in messages %}\r\n{{ m.content }}\r\n{% endfor %}",
    )
    .unwrap();
    let tok = AutoTokenizer::from_pretrained(dir.path()).unwrap();
    assert_eq!(tok.chat_templates().len(), 1);
    let text = tok
        .apply_chat_template(
            &[ChatMessage::user("a"), ChatMessage::assistant("b")],
            &ChatTemplateOptions::default(),
        )
        .unwrap();
    assert_eq!(text, "a\nb\n");
}

#[test]
fn raise_exception_is_a_typed_error_with_the_templates_message() {
    let tok = chat_tiny();
    let err = tok
        .apply_chat_template(
            &[ChatMessage::user("one"), ChatMessage::user("two")],
            &ChatTemplateOptions::default().chat_template("llama2"),
        )
        .unwrap_err();
    let TokenizerError::ChatTemplateRaised {
        path,
        name,
        line,
        message,
    } = &err
    else {
        panic!("expected ChatTemplateRaised, got {err:?}");
    };
    assert_eq!(
        message,
        "Conversation roles must alternate user/assistant/user/assistant/..."
    );
    assert_eq!(name, "llama2");
    assert_eq!(
        *line,
        Some(10),
        "the line of raise_exception in the template"
    );
    assert!(path.ends_with("tokenizer_config.json"));
    let shown = err.to_string();
    assert!(
        shown.contains("tokenizer_config.json") && shown.contains("line 10"),
        "{shown}"
    );
}

#[test]
fn missing_and_broken_templates_are_typed_errors() {
    let mut tok = AutoTokenizer::from_pretrained(fixtures().join("gpt2-bpe")).unwrap();
    let chat = [ChatMessage::user("hi")];
    let opts = ChatTemplateOptions::default();
    let err = tok.apply_chat_template(&chat, &opts).unwrap_err();
    assert!(matches!(err, TokenizerError::NoChatTemplate), "{err:?}");
    assert!(err.to_string().contains("no chat_template"), "{err}");
    assert!(tok.apply_chat_template_ids(&chat, &opts).is_err());

    tok.set_chat_template(Some("line 1\n{% for m in messages %}{{ m.content }"));
    let err = tok.apply_chat_template(&chat, &opts).unwrap_err();
    match &err {
        TokenizerError::ChatTemplate {
            path, line, name, ..
        } => {
            assert_eq!(path, Path::new("<set_chat_template>"));
            assert_eq!(name, "default");
            assert_eq!(*line, Some(2));
        }
        other => panic!("expected ChatTemplate, got {other:?}"),
    }
    // Errors while rendering (a method on undefined) are typed as well, never a panic.
    tok.set_chat_template(Some("{{ messages[0].nothing.strip() }}"));
    let err = tok.apply_chat_template(&chat, &opts).unwrap_err();
    assert!(
        matches!(err, TokenizerError::ChatTemplate { .. }),
        "{err:?}"
    );

    // Several named templates but no default, and none asked for: HF's error.
    let dir = tempfile::tempdir().unwrap();
    copy_folder(&fixtures().join("gpt2-bpe"), dir.path());
    std::fs::create_dir(dir.path().join(CHAT_TEMPLATE_DIR)).unwrap();
    std::fs::write(
        dir.path().join(CHAT_TEMPLATE_DIR).join("rag.jinja"),
        "{{ messages[0].content }}",
    )
    .unwrap();
    let tok = AutoTokenizer::from_pretrained(dir.path()).unwrap();
    let err = tok.apply_chat_template(&chat, &opts).unwrap_err();
    assert!(
        matches!(&err, TokenizerError::NoDefaultChatTemplate { names } if names == &["rag"]),
        "{err:?}"
    );
    let by_name = tok
        .apply_chat_template(&chat, &ChatTemplateOptions::default().chat_template("rag"))
        .unwrap();
    assert_eq!(by_name, "hi");

    // A malformed `chat_template` field names the file and the field.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("chat-tiny/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"chat_template": [{"name": "default"}]}"#,
    )
    .unwrap();
    let err = AutoTokenizer::from_pretrained(dir.path()).unwrap_err();
    assert!(
        matches!(&err, TokenizerError::InvalidField { field, .. } if field == "chat_template"),
        "{err:?}"
    );
}

#[test]
fn save_pretrained_writes_jinja_files_that_load_back_identically() {
    let tok = chat_tiny();
    let dir = tempfile::tempdir().unwrap();
    let written = tok.save_pretrained(dir.path()).unwrap();
    let names: Vec<String> = written
        .iter()
        .map(|p| {
            p.strip_prefix(dir.path())
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/")
        })
        .collect();
    assert!(names.contains(&CHAT_TEMPLATE_FILE.to_string()), "{names:?}");
    assert!(
        names.contains(&format!("{CHAT_TEMPLATE_DIR}/llama2.jinja")),
        "{names:?}"
    );
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert!(
        config.get("chat_template").is_none(),
        "the templates live in .jinja files only"
    );
    let back = AutoTokenizer::from_pretrained(dir.path()).unwrap();
    assert_eq!(
        back.chat_templates().keys().collect::<Vec<_>>(),
        tok.chat_templates().keys().collect::<Vec<_>>()
    );
    let expected = expected();
    for case in expected["cases"].as_array().unwrap() {
        if case["tokenizer"] != "chat-tiny" || !case["error"].is_null() {
            continue;
        }
        let chat = messages(&expected["conversations"][case["conversation"].as_str().unwrap()]);
        let opts = options(case);
        assert_eq!(
            back.apply_chat_template_ids(&chat, &opts).unwrap(),
            tok.apply_chat_template_ids(&chat, &opts).unwrap()
        );
    }
    let leftovers: Vec<_> = walk(dir.path())
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    // A template name that would escape the folder is refused, not written.
    let src = tempfile::tempdir().unwrap();
    copy_folder(&fixtures().join("chat-tiny"), src.path());
    std::fs::write(
        src.path().join("tokenizer_config.json"),
        r#"{"chat_template": [{"name": "default", "template": "x"}, {"name": "../evil", "template": "y"}]}"#,
    )
    .unwrap();
    let evil = AutoTokenizer::from_pretrained(src.path()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let err = evil.save_pretrained(out.path().join("saved")).unwrap_err();
    assert!(
        matches!(&err, TokenizerError::InvalidField { field, .. } if field == "chat_template"),
        "{err:?}"
    );
    assert!(
        !out.path().join("saved").exists(),
        "nothing is written when a name is refused"
    );
}

/// Copies the plain files of a folder.
fn copy_folder(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Folders Ember saved load in Python with the same templates: `apply_chat_template` there
/// renders what Ember renders (checked by `check_saved.py`).
#[test]
fn saved_templates_render_the_same_in_python() {
    let Some(python) = ember_testkit::reference_python() else {
        return;
    };
    let tok = chat_tiny();
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("chat-tiny");
    tok.save_pretrained(&dir).unwrap();
    let expected = expected();
    let mut chat_cases = Vec::new();
    for case in expected["cases"].as_array().unwrap() {
        if case["tokenizer"] != "chat-tiny" || !case["error"].is_null() {
            continue;
        }
        let chat = expected["conversations"][case["conversation"].as_str().unwrap()].clone();
        let text = tok
            .apply_chat_template(&messages(&chat), &options(case))
            .unwrap();
        chat_cases.push(serde_json::json!({
            "messages": chat, "options": case["options"], "template": case["template"], "text": text,
        }));
    }
    let request = serde_json::json!([{"dir": dir, "cases": [], "chat_cases": chat_cases}]);
    let mut child = std::process::Command::new(python)
        .arg(fixtures().join("check_saved.py"))
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
