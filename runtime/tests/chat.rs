//! Chat templates: the default model's own template against llama.cpp's rendering, and
//! the Jinja features Hugging Face templates rely on.

mod common;

use cairn::chat::{ChatError, ChatTemplate, Message};
use cairn_formats::{Gguf, GgufBuilder, MetaValue};

fn model_template() -> ChatTemplate {
    let bytes = std::fs::read(common::model_path()).expect("read model");
    let gguf = Gguf::parse(&bytes).expect("parse gguf");
    ChatTemplate::from_metadata(&gguf).expect("template")
}

const SYSTEM: &str =
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";

#[test]
fn renders_reference_chats() {
    let tmpl = model_template();
    let reference = common::reference();
    let mut n = 0;
    for seq in reference["sequences"].as_array().expect("sequences") {
        if seq["chat_messages"].is_null() {
            continue;
        }
        let messages: Vec<Message> = serde_json::from_value(seq["chat_messages"].clone()).expect("messages");
        let want = seq["rendered"].as_str().expect("rendered");
        assert_eq!(tmpl.render(&messages, true).expect("render"), want);
        n += 1;
    }
    assert!(n >= 2, "reference has chat sequences");
}

#[test]
fn renders_multi_turn() {
    let tmpl = model_template();
    let mut messages = vec![
        Message::new("user", "Hi!"),
        Message::new("assistant", "Hello. How can I help?"),
        Message::new("user", "Name a colour."),
    ];
    let turns = "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello. How can I help?<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n";
    assert_eq!(tmpl.render(&messages, false).expect("render"), format!("{SYSTEM}{turns}"));
    assert_eq!(tmpl.render(&messages, true).expect("render"), format!("{SYSTEM}{turns}<|im_start|>assistant\n"));
    // A system message of the user's replaces the default one.
    messages.insert(0, Message::new("system", "Be brief."));
    assert_eq!(
        tmpl.render(&messages, true).expect("render"),
        format!("<|im_start|>system\nBe brief.<|im_end|>\n{turns}<|im_start|>assistant\n")
    );
    assert!(tmpl.source().contains("<|im_start|>"));
}

fn gguf_with(template: Option<&str>) -> Vec<u8> {
    let mut b = GgufBuilder::new().meta(
        "tokenizer.ggml.tokens",
        MetaValue::array(["<s>", "</s>"].iter().map(|s| MetaValue::String(s.to_string())).collect()),
    );
    b = b.meta("tokenizer.ggml.bos_token_id", MetaValue::U32(0)).meta("tokenizer.ggml.eos_token_id", MetaValue::U32(1));
    if let Some(t) = template {
        b = b.meta("tokenizer.chat_template", MetaValue::String(t.into()));
    }
    b.build()
}

#[test]
fn missing_template_is_reported() {
    let bytes = gguf_with(None);
    let err = ChatTemplate::from_metadata(&Gguf::parse(&bytes).expect("parse")).expect_err("must fail");
    assert_eq!(err, ChatError::NoTemplate);
    assert!(err.to_string().contains("no chat template"));
}

#[test]
fn bos_and_eos_come_from_the_vocabulary() {
    let bytes = gguf_with(Some("{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"));
    let tmpl = ChatTemplate::from_metadata(&Gguf::parse(&bytes).expect("parse")).expect("template");
    let out = tmpl.render(&[Message::new("user", "a"), Message::new("assistant", "b")], false).expect("render");
    assert_eq!(out, "<s>a</s>b</s>");
}

#[test]
fn hugging_face_features() {
    // trim_blocks/lstrip_blocks, namespace, loop controls, Python string methods.
    let src = "{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m.role == 'skip' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
[{{ m.role | upper }}] {{ m.content.strip() }}{% if m.content.strip().startswith('Q') %}?{% endif %}

{% endfor %}
count={{ ns.n }} {{ 'a,b'.split(',') | join('+') }}";
    let tmpl = ChatTemplate::new(src, "", "").expect("compile");
    let out = tmpl
        .render(&[Message::new("user", "  Q1  "), Message::new("skip", "x"), Message::new("assistant", "A1")], false)
        .expect("render");
    assert_eq!(out, "[USER] Q1?\n[ASSISTANT] A1\ncount=2 a+b");
}

#[test]
fn raise_exception_becomes_an_error() {
    let src = "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{{ m.content }}{% endfor %}";
    let tmpl = ChatTemplate::new(src, "", "").expect("compile");
    assert_eq!(tmpl.render(&[Message::new("user", "ok")], false).expect("render"), "ok");
    let err = tmpl.render(&[Message::new("tool", "x")], false).expect_err("must fail");
    assert!(matches!(err, ChatError::Render(_)));
    assert!(err.to_string().contains("Only user and assistant roles are supported!"), "{err}");
}

#[test]
fn syntax_errors_are_reported() {
    let err = ChatTemplate::new("{% for m in messages %}", "", "").expect_err("must fail");
    assert!(matches!(err, ChatError::Syntax(_)), "{err}");
}

#[test]
fn tojson_is_python_json() {
    let src = "{{ {'name': 'f', 'desc': '<b> & é', 'args': [1, 2.5, true, none]} | tojson }}|{{ {'a': []} | tojson(indent=2) }}";
    let tmpl = ChatTemplate::new(src, "", "").expect("compile");
    let out = tmpl.render(&[], false).expect("render");
    assert_eq!(out, "{\"name\": \"f\", \"desc\": \"<b> & é\", \"args\": [1, 2.5, true, null]}|{\n  \"a\": []\n}");
}

#[test]
fn strftime_now_renders_a_date() {
    let tmpl = ChatTemplate::new("{{ strftime_now('%Y-%m-%d') }}", "", "").expect("compile");
    let out = tmpl.render(&[], false).expect("render");
    let parts: Vec<&str> = out.split('-').collect();
    assert_eq!(parts.len(), 3, "{out}");
    assert!(parts[0].parse::<u32>().expect("year") >= 2024);
    assert!((1..=12).contains(&parts[1].parse::<u32>().expect("month")));
    assert!((1..=31).contains(&parts[2].parse::<u32>().expect("day")));
}

#[test]
fn tojson_keeps_message_field_order() {
    let tmpl = ChatTemplate::new("{{ messages[0] | tojson }}", "", "").expect("compile");
    let out = tmpl.render(&[Message::new("user", "say \"hi\"\n")], false).expect("render");
    assert_eq!(out, r#"{"role": "user", "content": "say \"hi\"\n"}"#);
}
