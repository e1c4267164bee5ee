//! Chat templates: `tokenizer.apply_chat_template(messages, ...)` as `transformers` 5 renders
//! it.
//!
//! A chat template is a Jinja program shipped with a checkpoint (`chat_template.jinja`, or the
//! `chat_template` field of `tokenizer_config.json`) that turns a list of messages into the one
//! string a chat model was trained on. This module renders it with
//! [minijinja](https://docs.rs/minijinja) set up as `transformers` sets up Jinja2
//! (`_compile_jinja_template` in `transformers/utils/chat_template_utils.py`): `trim_blocks`,
//! `lstrip_blocks`, loop controls, the `raise_exception` and `strftime_now` globals, HF's
//! `tojson` filter (Python's `json.dumps`, non-ASCII kept), Python's string methods
//! (`.strip()`, `.split()`, `.startswith()`, ...), and the `{% generation %}` block.

use crate::auto::AutoTokenizer;
use crate::config::ROLES;
use crate::error::{Result, TokenizerError};
use minijinja::value::{Kwargs, Rest, Value as JinjaValue, ValueKind};
use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The file `transformers` 5 saves the default chat template to.
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";
/// The folder `transformers` 5 saves further named chat templates to, one `<name>.jinja` each.
pub const CHAT_TEMPLATE_DIR: &str = "additional_chat_templates";
/// The name of the template `apply_chat_template` uses when no other is asked for.
pub const DEFAULT_TEMPLATE_NAME: &str = "default";
/// What [`ChatTemplate::source`] holds for a template set with
/// [`AutoTokenizer::set_chat_template`] rather than read from a file.
pub const SET_IN_CODE: &str = "<set_chat_template>";

/// HF appends this to the final message for `continue_final_message` and cuts the output there.
const CONTINUE_TAG: &str = "CONTINUE_FINAL_MESSAGE_TAG ";

/// One message of a conversation: `{"role": "user", "content": "Hello"}` in Python.
///
/// ```
/// use ember_tokenizers::ChatMessage;
/// let chat = [ChatMessage::system("Be brief."), ChatMessage::user("Hi!")];
/// assert_eq!(chat[1].role, "user");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who speaks: `"system"`, `"user"`, `"assistant"` (templates may accept others, e.g.
    /// `"tool"`).
    pub role: String,
    /// What is said.
    pub content: String,
}

impl ChatMessage {
    /// A message with any role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A `"system"` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `"user"` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `"assistant"` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// The keyword arguments of HF `apply_chat_template`, with HF's defaults.
///
/// ```
/// use ember_tokenizers::ChatTemplateOptions;
/// // apply_chat_template(chat, add_generation_prompt=True, enable_thinking=False)
/// let opts = ChatTemplateOptions::default()
///     .add_generation_prompt(true)
///     .var("enable_thinking", false);
/// assert!(!opts.continue_final_message);
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatTemplateOptions {
    /// `add_generation_prompt`: end with the header that starts an assistant reply; default
    /// false.
    pub add_generation_prompt: bool,
    /// `continue_final_message`: leave the final message open (no end-of-turn tokens after it),
    /// so that the model continues it; default false. Cannot be combined with
    /// `add_generation_prompt`.
    pub continue_final_message: bool,
    /// Further template variables, HF's `**kwargs` (`enable_thinking=False`, ...). They
    /// override the special tokens of the same name, as in HF.
    pub extra: Map<String, Value>,
    /// `chat_template`: the name of one of the tokenizer's templates, or a Jinja template
    /// itself; `None` uses the tokenizer's default template.
    pub chat_template: Option<String>,
    /// `tools`: JSON schemas of the tools the model may call (`None` renders as `none`).
    pub tools: Option<Vec<Value>>,
    /// `documents`: documents for retrieval-augmented templates (`None` renders as `none`).
    pub documents: Option<Vec<Value>>,
}

impl ChatTemplateOptions {
    /// Sets `add_generation_prompt`.
    pub fn add_generation_prompt(mut self, yes: bool) -> Self {
        self.add_generation_prompt = yes;
        self
    }
    /// Sets `continue_final_message`.
    pub fn continue_final_message(mut self, yes: bool) -> Self {
        self.continue_final_message = yes;
        self
    }
    /// Sets one further template variable (HF's `**kwargs`).
    pub fn var(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.extra.insert(name.into(), value.into());
        self
    }
    /// Uses the named template of the tokenizer, or this Jinja source, instead of the default.
    pub fn chat_template(mut self, name_or_template: impl Into<String>) -> Self {
        self.chat_template = Some(name_or_template.into());
        self
    }
    /// Sets `tools`.
    pub fn tools(mut self, tools: Vec<Value>) -> Self {
        self.tools = Some(tools);
        self
    }
    /// Sets `documents`.
    pub fn documents(mut self, documents: Vec<Value>) -> Self {
        self.documents = Some(documents);
        self
    }
}

/// One chat template and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplate {
    /// The Jinja source.
    pub template: String,
    /// The file it was read from (`chat_template.jinja`, `tokenizer_config.json`, ...), or
    /// [`SET_IN_CODE`]; named in error messages.
    pub source: PathBuf,
}

impl ChatTemplate {
    /// A template set in code (its source is [`SET_IN_CODE`]).
    pub fn new(template: impl Into<String>) -> Self {
        Self {
            template: template.into(),
            source: PathBuf::from(SET_IN_CODE),
        }
    }
}

/// The chat templates of a tokenizer by name; a tokenizer with a single template has it under
/// [`DEFAULT_TEMPLATE_NAME`].
pub type ChatTemplates = BTreeMap<String, ChatTemplate>;

// ---- loading and saving ----------------------------------------------------------------------

/// Reads the `chat_template` field of `tokenizer_config.json`: a string (the default
/// template), or a list of `{"name": ..., "template": ...}` objects, as HF writes several.
pub(crate) fn templates_from_config(
    path: &Path,
    raw: &Map<String, Value>,
) -> Result<ChatTemplates> {
    let invalid = |message: String| TokenizerError::InvalidField {
        path: path.to_owned(),
        field: "chat_template".into(),
        message,
    };
    let template = |text: &str| ChatTemplate {
        template: text.to_owned(),
        source: path.to_owned(),
    };
    let mut out = ChatTemplates::new();
    match raw.get("chat_template") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            out.insert(DEFAULT_TEMPLATE_NAME.into(), template(s));
        }
        Some(Value::Array(list)) => {
            for (i, item) in list.iter().enumerate() {
                let name = item.get("name").and_then(Value::as_str);
                let text = item.get("template").and_then(Value::as_str);
                let (Some(name), Some(text)) = (name, text) else {
                    return Err(invalid(format!(
                        "entry {i} is not an object with string `name` and `template`"
                    )));
                };
                out.insert(name.to_owned(), template(text));
            }
        }
        Some(other) => {
            return Err(invalid(format!(
                "expected a template string or a list of {{\"name\", \"template\"}} objects, \
                 found {other}"
            )))
        }
    }
    Ok(out)
}

/// Reads `chat_template.jinja` (the default template) and `additional_chat_templates/*.jinja`
/// (named ones) from a tokenizer folder; empty when there are none. As in HF, these files take
/// priority over the `chat_template` field of `tokenizer_config.json`.
pub(crate) fn templates_from_files(dir: &Path) -> Result<ChatTemplates> {
    let mut out = ChatTemplates::new();
    let main = dir.join(CHAT_TEMPLATE_FILE);
    if main.is_file() {
        out.insert(DEFAULT_TEMPLATE_NAME.into(), read_template_file(&main)?);
    }
    let extra = dir.join(CHAT_TEMPLATE_DIR);
    if extra.is_dir() {
        let entries = std::fs::read_dir(&extra).map_err(|e| TokenizerError::io(&extra, e))?;
        for entry in entries {
            let path = entry.map_err(|e| TokenizerError::io(&extra, e))?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".jinja"));
            if let Some(name) = name.filter(|_| path.is_file()) {
                out.insert(name.to_owned(), read_template_file(&path)?);
            }
        }
    }
    Ok(out)
}

/// Reads a template file as Python's text mode does: UTF-8, with `\r\n` and `\r` read as `\n`.
fn read_template_file(path: &Path) -> Result<ChatTemplate> {
    let text = std::fs::read_to_string(path).map_err(|e| TokenizerError::io(path, e))?;
    let template = if text.contains('\r') {
        text.replace("\r\n", "\n").replace('\r', "\n")
    } else {
        text
    };
    Ok(ChatTemplate {
        template,
        source: path.to_owned(),
    })
}

/// The files `save_pretrained` writes for the templates, as HF 5 does: the default template to
/// `chat_template.jinja`, each other one to `additional_chat_templates/<name>.jinja`. Returns
/// (path relative to the folder, text) pairs.
pub(crate) fn template_files(templates: &ChatTemplates) -> Result<Vec<(PathBuf, &str)>> {
    let mut files = Vec::new();
    for (name, t) in templates {
        if name == DEFAULT_TEMPLATE_NAME {
            files.push((PathBuf::from(CHAT_TEMPLATE_FILE), t.template.as_str()));
            continue;
        }
        // The name becomes a file name: refuse anything that would leave the folder.
        let plain =
            !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0']);
        if !plain {
            return Err(TokenizerError::InvalidField {
                path: t.source.clone(),
                field: "chat_template".into(),
                message: format!("template name {name:?} cannot be a file name"),
            });
        }
        files.push((
            Path::new(CHAT_TEMPLATE_DIR).join(format!("{name}.jinja")),
            t.template.as_str(),
        ));
    }
    Ok(files)
}

// ---- AutoTokenizer methods ---------------------------------------------------------------------

impl AutoTokenizer {
    /// `tokenizer.chat_template`: the default chat template, `None` when the tokenizer has none.
    pub fn chat_template(&self) -> Option<&str> {
        self.config()
            .chat_templates
            .get(DEFAULT_TEMPLATE_NAME)
            .map(|t| t.template.as_str())
    }

    /// Every chat template by name (HF's dict form of `tokenizer.chat_template`).
    pub fn chat_templates(&self) -> &ChatTemplates {
        &self.config().chat_templates
    }

    /// `tokenizer.chat_template = template`: replaces every template with this one (the
    /// default), or removes them all with `None`. Saved by `save_pretrained`.
    pub fn set_chat_template(&mut self, template: Option<&str>) {
        let templates = &mut self.config_mut().chat_templates;
        templates.clear();
        if let Some(t) = template {
            templates.insert(DEFAULT_TEMPLATE_NAME.into(), ChatTemplate::new(t));
        }
    }

    /// `apply_chat_template(messages, tokenize=False, ...)`: renders a conversation with the
    /// tokenizer's chat template into the prompt string, exactly as `transformers` 5 does.
    ///
    /// The template sees `messages`, `add_generation_prompt`, `tools`, `documents`, every
    /// special token the tokenizer has (`bos_token`, `eos_token`, ...) and the extra variables
    /// of `options`.
    ///
    /// ```
    /// use ember_tokenizers::{demo, ChatMessage, ChatTemplateOptions};
    /// let mut tok = demo::demo_tokenizer()?;
    /// tok.set_chat_template(Some(
    ///     "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}\
    ///      {% if add_generation_prompt %}<|assistant|>{% endif %}",
    /// ));
    /// let text = tok.apply_chat_template(
    ///     &[ChatMessage::user("Is the room clean?")],
    ///     &ChatTemplateOptions::default().add_generation_prompt(true),
    /// )?;
    /// assert_eq!(text, "<|user|>Is the room clean?\n<|assistant|>");
    /// # Ok::<(), ember_tokenizers::TokenizerError>(())
    /// ```
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        options: &ChatTemplateOptions,
    ) -> Result<String> {
        let (name, template) = self.select_template(options)?;
        if messages.is_empty() {
            return Err(TokenizerError::InvalidChat(
                "cannot apply a chat template to an empty conversation; provide at least one \
                 message"
                    .into(),
            ));
        }
        if options.continue_final_message && options.add_generation_prompt {
            return Err(TokenizerError::InvalidChat(
                "continue_final_message and add_generation_prompt are not compatible: use \
                 continue_final_message to let the model continue the final message, \
                 add_generation_prompt to start a new assistant message"
                    .into(),
            ));
        }
        let mut messages = messages.to_vec();
        let mut final_content = None;
        if options.continue_final_message {
            // HF checks that the template reads the field at all.
            if !template.template.contains("content") {
                return Err(TokenizerError::InvalidChat(
                    "continue_final_message is set to \"content\" but this is not an accepted \
                     field in the chat_template"
                        .into(),
                ));
            }
            let last = messages.last_mut().expect("the conversation is not empty");
            final_content = Some(last.content.clone());
            last.content.push_str(CONTINUE_TAG);
        }

        let context = self.template_context(&messages, options)?;
        let rendered = render(&name, template, context)?;

        match final_content {
            None => Ok(rendered),
            Some(content) => cut_after_final_message(rendered, &content),
        }
    }

    /// `apply_chat_template(messages, tokenize=True, return_dict=False, ...)`: the ids of the
    /// rendered prompt. The text is encoded without adding special tokens (the template writes
    /// them), as HF does.
    pub fn apply_chat_template_ids(
        &self,
        messages: &[ChatMessage],
        options: &ChatTemplateOptions,
    ) -> Result<Vec<u32>> {
        let text = self.apply_chat_template(messages, options)?;
        self.encode(&text, None, false)
    }

    /// HF's `get_chat_template`: the template asked for by name or given inline, else the
    /// tool-use template when tools are given and there is one, else the default.
    fn select_template(&self, options: &ChatTemplateOptions) -> Result<(String, ChatTemplate)> {
        let templates = &self.config().chat_templates;
        if let Some(asked) = &options.chat_template {
            if let Some(t) = templates.get(asked) {
                return Ok((asked.clone(), t.clone()));
            }
            return Ok(("chat_template argument".into(), ChatTemplate::new(asked)));
        }
        if options.tools.is_some() {
            if let Some(t) = templates.get("tool_use") {
                return Ok(("tool_use".into(), t.clone()));
            }
        }
        if let Some(t) = templates.get(DEFAULT_TEMPLATE_NAME) {
            return Ok((DEFAULT_TEMPLATE_NAME.into(), t.clone()));
        }
        if templates.is_empty() {
            Err(TokenizerError::NoChatTemplate)
        } else {
            Err(TokenizerError::NoDefaultChatTemplate {
                names: templates.keys().cloned().collect(),
            })
        }
    }

    /// The variables the template sees: special tokens, then the extra variables (which
    /// override them), then `messages`, `tools`, `documents` and `add_generation_prompt`.
    fn template_context(
        &self,
        messages: &[ChatMessage],
        options: &ChatTemplateOptions,
    ) -> Result<Map<String, Value>> {
        let mut context = Map::new();
        let special = self.special_tokens();
        for role in ROLES {
            if let Some(token) = special.get(role) {
                context.insert(role.into(), Value::String(token.into()));
            }
        }
        for (key, value) in &options.extra {
            if matches!(
                key.as_str(),
                "messages" | "tools" | "documents" | "add_generation_prompt"
            ) {
                return Err(TokenizerError::InvalidChat(format!(
                    "extra template variable `{key}` clashes with the variable \
                     apply_chat_template sets itself"
                )));
            }
            context.insert(key.clone(), value.clone());
        }
        let messages = serde_json::to_value(messages).expect("messages are plain strings");
        context.insert("messages".into(), messages);
        let list = |v: &Option<Vec<Value>>| v.clone().map_or(Value::Null, Value::Array);
        context.insert("tools".into(), list(&options.tools));
        context.insert("documents".into(), list(&options.documents));
        context.insert(
            "add_generation_prompt".into(),
            Value::Bool(options.add_generation_prompt),
        );
        Ok(context)
    }
}

/// HF's `continue_final_message`: the final message was rendered with [`CONTINUE_TAG`]
/// appended; cut the output at the tag (and the spacing the template trimmed from it).
fn cut_after_final_message(rendered: String, final_content: &str) -> Result<String> {
    let tag = CONTINUE_TAG.trim_end();
    if !rendered.contains(py_strip(final_content)) || !rendered.contains(tag) {
        return Err(TokenizerError::InvalidChat(format!(
            "continue_final_message is set but the final message does not appear in the chat \
             after applying the chat template (the template may delete parts of it); final \
             message: {:?}",
            py_strip(final_content)
        )));
    }
    let at = rendered.rfind(tag).expect("checked above");
    let mut out = rendered;
    if out[at..].starts_with(CONTINUE_TAG) {
        out.truncate(at);
    } else {
        out.truncate(at);
        let kept = out.trim_end_matches(py_isspace).len();
        out.truncate(kept);
    }
    Ok(out)
}

/// Python's `str.isspace` for one character (Unicode White_Space plus the ASCII separators
/// `\x1c`..`\x1f`).
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

/// Python's `str.strip()`.
fn py_strip(s: &str) -> &str {
    s.trim_matches(py_isspace)
}

// ---- rendering --------------------------------------------------------------------------------

/// The source of an error raised by the template's `raise_exception(message)`.
#[derive(Debug)]
struct RaisedByTemplate(String);

impl std::fmt::Display for RaisedByTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedByTemplate {}

/// Renders one template with HF's Jinja environment.
fn render(name: &str, template: ChatTemplate, context: Map<String, Value>) -> Result<String> {
    let env = environment();
    let source = rewrite_generation_blocks(&template.template);
    let compiled = env
        .template_from_named_str(name, &source)
        .map_err(|e| template_error(name, &template.source, &e))?;
    compiled
        .render(JinjaValue::from_serialize(&context))
        .map_err(|e| template_error(name, &template.source, &e))
}

/// The Jinja environment of HF's `_compile_jinja_template`.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    // `{{ value }}` prints lists, dicts and floats as Python's `str()` does.
    env.set_formatter(|out, state, value| match value.kind() {
        ValueKind::Seq | ValueKind::Map | ValueKind::Number if !value.is_integer() => {
            let mut text = String::new();
            py_repr(&mut text, value)?;
            out.write_str(&text).map_err(minijinja::Error::from)
        }
        _ => minijinja::escape_formatter(out, state, value),
    });
    env.add_filter("tojson", tojson);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env
}

fn template_error(name: &str, path: &Path, err: &minijinja::Error) -> TokenizerError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cause {
        if let Some(raised) = e.downcast_ref::<RaisedByTemplate>() {
            return TokenizerError::ChatTemplateRaised {
                path: path.to_owned(),
                name: name.to_owned(),
                line: err.line(),
                message: raised.0.clone(),
            };
        }
        cause = e.source();
    }
    let mut message = err.kind().to_string();
    if let Some(detail) = err.detail() {
        let _ = write!(message, ": {detail}");
    }
    TokenizerError::ChatTemplate {
        path: path.to_owned(),
        name: name.to_owned(),
        line: err.line(),
        message,
    }
}

/// `raise_exception(message)`: stops rendering with the template's own message.
fn raise_exception(message: JinjaValue) -> std::result::Result<JinjaValue, minijinja::Error> {
    let message = message.to_string();
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, message.clone())
            .with_source(RaisedByTemplate(message)),
    )
}

/// `strftime_now(format)`: the local time, formatted with strftime codes. A code the formatter
/// does not know is written as it is, as Python's (glibc's) `strftime` does.
fn strftime_now(format: &str) -> String {
    strftime(&chrono::Local::now(), format)
}

fn strftime<Tz: chrono::TimeZone>(time: &chrono::DateTime<Tz>, format: &str) -> String
where
    Tz::Offset: std::fmt::Display,
{
    let mut out = String::new();
    if write!(out, "{}", time.format(format)).is_ok() {
        return out;
    }
    // Some code is unknown: format code by code and keep the unknown ones literally.
    out.clear();
    let mut rest = format;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let spec = strftime_spec(&rest[at..]);
        let mut piece = String::new();
        if write!(piece, "{}", time.format(spec)).is_ok() {
            out.push_str(&piece);
        } else {
            out.push_str(spec);
        }
        rest = &rest[at + spec.len()..];
    }
    out.push_str(rest);
    out
}

/// The strftime code at the start of `s` (which starts with `%`): flags, width or precision,
/// and the conversion character.
fn strftime_spec(s: &str) -> &str {
    let mut end = 1;
    let bytes = s.as_bytes();
    while matches!(
        bytes.get(end),
        Some(b'-' | b'_' | b'0' | b'^' | b'#' | b':' | b'.')
    ) {
        end += 1;
    }
    while bytes.get(end).is_some_and(u8::is_ascii_digit) {
        end += 1;
    }
    match s[end..].chars().next() {
        Some(c) => &s[..end + c.len_utf8()],
        None => &s[..end],
    }
}

/// Jinja2 knows `{% generation %}...{% endgeneration %}` only through HF's extension, which
/// renders the body unchanged when assistant masks are not asked for. The tags become
/// `{% if true %}` / `{% endif %}`: the same body, the same whitespace control, the same lines.
fn rewrite_generation_blocks(template: &str) -> std::borrow::Cow<'_, str> {
    if !template.contains("generation") {
        return template.into();
    }
    let bytes = template.as_bytes();
    let mut out = String::with_capacity(template.len());
    let mut copied = 0;
    let mut i = 0;
    while let Some(found) = template[i..].find("{%") {
        let start = i + found;
        let mut j = start + 2;
        if matches!(bytes.get(j), Some(b'-' | b'+')) {
            j += 1;
        }
        while matches!(bytes.get(j), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            j += 1;
        }
        let word_end = template[j..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(template.len(), |n| j + n);
        let replacement = match &template[j..word_end] {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        if let Some(replacement) = replacement {
            let mut k = word_end;
            while matches!(bytes.get(k), Some(b' ' | b'\t' | b'\n' | b'\r')) {
                k += 1;
            }
            if matches!(bytes.get(k), Some(b'-' | b'+')) {
                k += 1;
            }
            if template[k..].starts_with("%}") {
                out.push_str(&template[copied..j]);
                out.push_str(replacement);
                copied = word_end;
            }
        }
        i = start + 2;
    }
    out.push_str(&template[copied..]);
    out.into()
}

/// Python's `repr()` of a list, dict, float or scalar inside them (what `str()` of a list
/// prints): `[1, 'a', None, True, 2.5]`, `{'k': 'v'}`.
fn py_repr(out: &mut String, value: &JinjaValue) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number if !value.is_integer() => {
            let f = f64::try_from(value.clone())?;
            out.push_str(&if f.is_nan() {
                "nan".to_owned()
            } else if f.is_infinite() {
                if f > 0.0 { "inf" } else { "-inf" }.to_owned()
            } else {
                py_float_repr(f)
            });
        }
        ValueKind::String => py_str_repr(out, value.as_str().unwrap_or_default()),
        ValueKind::Seq => {
            out.push('[');
            for (i, item) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(out, &item)?;
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(out, &key)?;
                out.push_str(": ");
                py_repr(out, &value.get_item(&key)?)?;
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{value}");
        }
    }
    Ok(())
}

/// Python's `repr(str)`: single quotes unless the text has `'` and no `"`; backslash escapes
/// for the quote, `\\`, `\n`, `\r`, `\t` and other control characters.
fn py_str_repr(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || (0x7f..0xa0).contains(&(c as u32)) => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

// ---- tojson: Python's json.dumps ---------------------------------------------------------------

/// HF's `tojson` filter: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, not Jinja's HTML-safe one.
fn tojson(
    value: &JinjaValue,
    args: Rest<JinjaValue>,
) -> std::result::Result<String, minijinja::Error> {
    let mut positional: Vec<JinjaValue> = args.0;
    let kwargs = match positional.last() {
        Some(last) if last.is_kwargs() => Some(Kwargs::try_from(
            positional.pop().expect("has a last element"),
        )?),
        _ => None,
    };
    const NAMES: [&str; 4] = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if positional.len() > NAMES.len() {
        return Err(minijinja::Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 arguments (ensure_ascii, indent, separators, sort_keys)",
        ));
    }
    let mut given: [Option<JinjaValue>; 4] = Default::default();
    for (slot, v) in given.iter_mut().zip(positional) {
        *slot = Some(v);
    }
    if let Some(kwargs) = &kwargs {
        for (slot, name) in given.iter_mut().zip(NAMES) {
            if let Some(v) = kwargs.get::<Option<JinjaValue>>(name)? {
                if slot.is_some() {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        format!("tojson got multiple values for argument {name:?}"),
                    ));
                }
                *slot = Some(v);
            }
        }
        kwargs.assert_all_used()?;
    }
    let [ensure_ascii, indent, separators, sort_keys] = given;
    let bad = |what: &str| minijinja::Error::new(ErrorKind::InvalidOperation, what.to_owned());
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_owned(),
            None if v.kind() == ValueKind::Bool => " ".repeat(usize::from(v.is_true())),
            None if v.is_integer() => {
                let n = i64::try_from(v).map_err(|_| bad("tojson: indent out of range"))?;
                " ".repeat(usize::try_from(n).unwrap_or(0))
            }
            None => return Err(bad("tojson: indent must be an integer or a string")),
        }),
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !(v.is_none() || v.is_undefined()) => {
            let parts: Vec<String> = v
                .try_iter()
                .map_err(|_| bad("tojson: separators must be a pair of strings"))?
                .map(|p| p.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("tojson: separators must be a pair of strings"))?;
            match <[String; 2]>::try_from(parts) {
                Ok([a, b]) => (a, b),
                Err(_) => return Err(bad("tojson: separators must be a pair of strings")),
            }
        }
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let writer = PyJson {
        ensure_ascii: ensure_ascii.is_some_and(|v| v.is_true()),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.is_some_and(|v| v.is_true()),
    };
    let mut out = String::new();
    writer.write(&mut out, value, 0)?;
    Ok(out)
}

/// The settings of one `json.dumps` call.
struct PyJson {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl PyJson {
    fn write(
        &self,
        out: &mut String,
        value: &JinjaValue,
        level: usize,
    ) -> std::result::Result<(), minijinja::Error> {
        let unsupported = || {
            minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!(
                    "tojson: object of type {} is not JSON serializable",
                    value.kind()
                ),
            )
        };
        match value.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number if value.is_integer() => {
                let n = i128::try_from(value.clone()).map_err(|_| unsupported())?;
                let _ = write!(out, "{n}");
            }
            ValueKind::Number => {
                let f = f64::try_from(value.clone()).map_err(|_| unsupported())?;
                out.push_str(&py_json_float(f));
            }
            ValueKind::String => self.write_str(out, value.as_str().unwrap_or_default()),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<JinjaValue> = value.try_iter()?.collect();
                self.write_container(out, level, '[', ']', &items, |out, item, level| {
                    self.write(out, item, level)
                })?;
            }
            ValueKind::Map => {
                let mut entries: Vec<(String, JinjaValue)> = Vec::new();
                for key in value.try_iter()? {
                    let item = value.get_item(&key)?;
                    entries.push((py_json_key(&key).ok_or_else(unsupported)?, item));
                }
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.write_container(out, level, '{', '}', &entries, |out, (k, v), level| {
                    self.write_str(out, k);
                    out.push_str(&self.key_sep);
                    self.write(out, v, level)
                })?;
            }
            _ => return Err(unsupported()),
        }
        Ok(())
    }

    /// Writes `[a, b]` / `{...}` the way `json.dumps` lays them out, with or without `indent`.
    fn write_container<T>(
        &self,
        out: &mut String,
        level: usize,
        open: char,
        close: char,
        items: &[T],
        mut each: impl FnMut(&mut String, &T, usize) -> std::result::Result<(), minijinja::Error>,
    ) -> std::result::Result<(), minijinja::Error> {
        out.push(open);
        if items.is_empty() {
            out.push(close);
            return Ok(());
        }
        let newline = |out: &mut String, level: usize| {
            if let Some(indent) = &self.indent {
                out.push('\n');
                for _ in 0..level {
                    out.push_str(indent);
                }
            }
        };
        newline(out, level + 1);
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item_sep);
                newline(out, level + 1);
            }
            each(out, item, level + 1)?;
        }
        newline(out, level);
        out.push(close);
        Ok(())
    }

    /// A JSON string as Python writes it: `\"`, `\\`, `\n` ... escaped, other control
    /// characters as `\u00XX`; with `ensure_ascii`, every non-ASCII character as `\uXXXX`
    /// (surrogate pairs above the BMP).
    fn write_str(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c if self.ensure_ascii && (c as u32) > 0x7e => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// A dict key as `json.dumps` writes it: strings as they are, numbers, booleans and `None`
/// converted; `None` for keys Python refuses.
fn py_json_key(key: &JinjaValue) -> Option<String> {
    match key.kind() {
        ValueKind::String => key.as_str().map(str::to_owned),
        ValueKind::None => Some("null".into()),
        ValueKind::Bool => Some(if key.is_true() { "true" } else { "false" }.into()),
        ValueKind::Number if key.is_integer() => {
            i128::try_from(key.clone()).ok().map(|n| n.to_string())
        }
        ValueKind::Number => f64::try_from(key.clone()).ok().map(py_json_float),
        _ => None,
    }
}

/// A float as `json.dumps` writes it: Python's `repr` (shortest round trip, exponent below
/// 1e-4 and from 1e16), `NaN`, `Infinity`, `-Infinity`.
fn py_json_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    py_float_repr(f)
}

/// Python's `repr(float)` for a finite value.
fn py_float_repr(f: f64) -> String {
    // `{:e}` gives the shortest round-trip digits: "-1.2345e-7".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').expect("`{:e}` always has an exponent");
    let exp: i32 = exp.parse().expect("`{:e}` writes an integer exponent");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let point = exp + 1; // digits are 0.DIGITS × 10^point
    let n = digits.len() as i32;
    if -4 < point && point <= 16 {
        if point <= 0 {
            format!("{sign}0.{}{digits}", "0".repeat((-point) as usize))
        } else if point >= n {
            format!("{sign}{digits}{}.0", "0".repeat((point - n) as usize))
        } else {
            let (int, frac) = digits.split_at(point as usize);
            format!("{sign}{int}.{frac}")
        }
    } else {
        let exp_sign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{exp_sign}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render_str(template: &str, context: Value) -> Result<String> {
        let Value::Object(map) = context else {
            panic!("context must be an object")
        };
        render("test", ChatTemplate::new(template), map)
    }

    #[test]
    fn python_float_repr() {
        for (f, want) in [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (0.1, "0.1"),
            (123.456, "123.456"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345e22, "1.2345e+22"),
            (-2.5e-300, "-2.5e-300"),
            (f64::MAX, "1.7976931348623157e+308"),
        ] {
            assert_eq!(py_float_repr(f), want, "{f}");
        }
        assert_eq!(py_json_float(f64::NAN), "NaN");
        assert_eq!(py_json_float(f64::NEG_INFINITY), "-Infinity");
    }

    #[test]
    fn tojson_follows_json_dumps() {
        let ctx =
            serde_json::json!({"x": {"b": [1, 2.5, "é\n\"<>&'", null, true], "a": {}, "c": []}});
        let r = |t: &str| render_str(t, ctx.clone()).unwrap();
        assert_eq!(
            r("{{ x | tojson }}"),
            r#"{"b": [1, 2.5, "é\n\"<>&'", null, true], "a": {}, "c": []}"#
        );
        assert_eq!(
            r("{{ x | tojson(indent=2, sort_keys=true) }}"),
            "{\n  \"a\": {},\n  \"b\": [\n    1,\n    2.5,\n    \"é\\n\\\"<>&'\",\n    null,\n    \
             true\n  ],\n  \"c\": []\n}"
        );
        assert_eq!(
            r("{{ x.b | tojson(ensure_ascii=true, separators=(',', ':')) }}"),
            r#"[1,2.5,"\u00e9\n\"<>&'",null,true]"#
        );
        assert_eq!(r("{{ '😀' | tojson(true) }}"), r#""\ud83d\ude00""#);
        assert!(render_str("{{ x | tojson(bogus=1) }}", ctx.clone()).is_err());
        assert!(render_str("{{ nothing | tojson }}", ctx).is_err());
    }

    #[test]
    fn generation_blocks_render_their_body() {
        let t = "{% for m in messages %}{%- generation -%}\n[{{ m }}]\n{%- endgeneration %}\n{% endfor %}";
        assert_eq!(
            rewrite_generation_blocks(t),
            "{% for m in messages %}{%- if true -%}\n[{{ m }}]\n{%- endif %}\n{% endfor %}"
        );
        let out = render_str(t, serde_json::json!({"messages": ["a", "b"]})).unwrap();
        assert_eq!(out, "[a][b]");
        // Other tags and text that merely mention the word are left alone.
        let plain = "{% set generation_x = 1 %}generation {{ generation_x }}";
        assert_eq!(rewrite_generation_blocks(plain), plain);
    }

    #[test]
    fn raise_exception_and_syntax_errors_are_typed() {
        let err = render_str(
            "line one\n{{ raise_exception('roles must alternate') }}",
            serde_json::json!({}),
        )
        .unwrap_err();
        match err {
            TokenizerError::ChatTemplateRaised { message, line, .. } => {
                assert_eq!(message, "roles must alternate");
                assert_eq!(line, Some(2));
            }
            other => panic!("unexpected {other:?}"),
        }
        let err = render_str("{% for x in %}", serde_json::json!({})).unwrap_err();
        assert!(
            matches!(err, TokenizerError::ChatTemplate { line: Some(1), .. }),
            "{err:?}"
        );
    }

    #[test]
    fn strftime_follows_python() {
        use chrono::TimeZone;
        let t = chrono::Utc.with_ymd_and_hms(2026, 7, 4, 9, 5, 3).unwrap();
        assert_eq!(strftime(&t, "%d %b %Y"), "04 Jul 2026");
        assert_eq!(strftime(&t, "%-d %B %Y, %H:%M:%S"), "4 July 2026, 09:05:03");
        // Unknown codes and a lone `%` are kept, as glibc's strftime keeps them.
        assert_eq!(strftime(&t, "%Q %Y %"), "%Q 2026 %");
        let year = chrono::Local::now().format("%Y").to_string();
        let out = render_str("{{ strftime_now('%Y') }}", serde_json::json!({})).unwrap();
        assert_eq!(out, year);
    }

    #[test]
    fn python_string_methods_and_whitespace_control() {
        let out = render_str(
            "{% for m in messages %}\n  {{ m.content.strip().title() }}|{{ m.role.startswith('u') }}\n{% endfor %}",
            serde_json::json!({"messages": [{"role": "user", "content": "  hi there "}]}),
        )
        .unwrap();
        // lstrip_blocks strips before `{% %}` tags only, as in Jinja2.
        assert_eq!(out, "  Hi There|True\n");
    }

    #[test]
    fn continue_final_message_cuts_at_the_tag() {
        let out = cut_after_final_message(format!("<u>a</u><a>Hello{CONTINUE_TAG}</a>\n"), "Hello")
            .unwrap();
        assert_eq!(out, "<u>a</u><a>Hello");
        // A template that strips the content loses the tag's space: cut and strip instead.
        let out =
            cut_after_final_message("<a>Hello CONTINUE_FINAL_MESSAGE_TAG</a>".into(), "Hello ")
                .unwrap();
        assert_eq!(out, "<a>Hello");
        assert!(cut_after_final_message("<a></a>".into(), "Hello").is_err());
    }
}
