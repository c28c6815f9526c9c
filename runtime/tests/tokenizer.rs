//! The tokenizer against llama.cpp's ids on the default model, plus edge cases on
//! small synthetic vocabularies.

mod common;

use std::sync::OnceLock;

use cairn::tokenizer::{StreamDecoder, TokenType, Tokenizer, TokenizerError};
use cairn_formats::{Gguf, GgufBuilder, MetaValue};
use serde_json::Value;

fn model_bytes() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| std::fs::read(common::model_path()).expect("read model"))
}

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let gguf = Gguf::parse(model_bytes()).expect("parse gguf");
        let t0 = std::time::Instant::now();
        let tok = Tokenizer::from_metadata(&gguf).expect("build tokenizer");
        eprintln!("tokenizer built in {:?}", t0.elapsed());
        tok
    })
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("id array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

#[test]
fn reference_tokenize_cases() {
    let tok = tokenizer();
    let reference = common::reference();
    let cases = reference["tokenize"].as_array().expect("tokenize cases");
    assert!(!cases.is_empty());
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let parse_special = case["parse_special"].as_bool().expect("parse_special");
        let want = ids(&case["ids"]);
        let got = tok.encode(text, parse_special).expect("encode");
        assert_eq!(got, want, "ids of {text:?}");
        let detok = case["detokenized"].as_str().expect("detokenized");
        assert_eq!(tok.decode(&want).expect("decode"), detok, "text of {want:?}");
    }
}

#[test]
fn reference_prompt_ids() {
    let tok = tokenizer();
    let reference = common::reference();
    for seq in reference["sequences"].as_array().expect("sequences") {
        let name = seq["name"].as_str().unwrap_or("?");
        let rendered = seq["rendered"].as_str().expect("rendered");
        let want = ids(&seq["prompt_ids"]);
        assert_eq!(tok.encode(rendered, true).expect("encode"), want, "prompt ids of {name}");
        assert_eq!(tok.decode(&want).expect("decode"), rendered, "prompt text of {name}");
        // The model's metadata says no BOS: adding special tokens changes nothing.
        assert_eq!(tok.encode_with_special(rendered, true).expect("encode"), want);

        // llama.cpp's continuation text is its ids decoded, minus the stop token.
        let mut greedy = ids(&seq["greedy_ids"]);
        if greedy.last().is_some_and(|&t| tok.is_eog(t)) {
            greedy.pop();
        }
        let text = seq["greedy_text"].as_str().expect("greedy_text");
        assert_eq!(tok.decode(&greedy).expect("decode"), text, "greedy text of {name}");
    }
}

#[test]
fn special_ids_match_reference() {
    let tok = tokenizer();
    let reference = common::reference();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), reference["eos_id"].as_u64().map(|x| x as u32));
    assert_eq!(tok.eot_id(), Some(2), "<|im_end|>");
    assert_eq!(tok.eog_ids(), ids(&reference["stop_ids"]).as_slice());
    assert!(!tok.add_bos());
    assert!(!tok.add_eos());
    for id in 0..17 {
        assert!(tok.is_special(id), "token {id} is a control token");
        assert_eq!(tok.token_type(id), Some(TokenType::Control));
    }
    assert!(!tok.is_special(17));
    assert_eq!(tok.token_to_piece(1).expect("piece"), b"<|im_start|>");
    // "Ġ" stands for the space byte.
    let space_the = tok.encode(" the", false).expect("encode");
    assert_eq!(space_the.len(), 1);
    assert_eq!(tok.token_to_piece(space_the[0]).expect("piece"), b" the");
}

#[test]
fn parse_special_off_treats_markup_as_text() {
    let tok = tokenizer();
    let text = "<|im_start|>user\nHi<|im_end|>";
    let with = tok.encode(text, true).expect("encode");
    let without = tok.encode(text, false).expect("encode");
    assert_eq!(with[0], 1);
    assert!(without.iter().all(|&t| !tok.is_special(t)), "{without:?}");
    assert!(without.len() > with.len());
    // Either way the text survives a round trip.
    assert_eq!(tok.decode(&without).expect("decode"), text);
    assert_eq!(tok.decode(&with).expect("decode"), text);
}

#[test]
fn round_trips_arbitrary_text() {
    let tok = tokenizer();
    for text in [
        "",
        " ",
        "\n\n\n",
        "a<|im_end",
        "<|im_start|><|im_start|>",
        "tab\tand\u{0}nul",
        "ümlaut 0123 ١٢٣ ½",
        "mixed 中文 and עברית, ok?",
    ] {
        let ids = tok.encode(text, true).expect("encode");
        assert_eq!(tok.decode(&ids).expect("decode"), text, "{ids:?}");
    }
    assert!(tok.encode("", true).expect("encode").is_empty());
}

#[test]
fn out_of_range_ids_are_errors() {
    let tok = tokenizer();
    let n = tok.vocab_size() as u32;
    let err = TokenizerError::TokenOutOfRange { id: n, vocab_size: n as usize };
    assert_eq!(tok.decode(&[5, n]), Err(err.clone()));
    assert_eq!(tok.token_to_piece(n), Err(err));
    assert!(tok.token_to_piece(u32::MAX).is_err());
    assert!(!tok.is_special(u32::MAX));
    assert!(!tok.is_eog(u32::MAX));
    assert_eq!(tok.token_type(u32::MAX), None);
    let mut dec = StreamDecoder::new();
    assert!(dec.push(tok, n).is_err());
}

#[test]
fn stream_decoder_holds_split_characters() {
    let tok = tokenizer();
    let reference = common::reference();
    for case in reference["tokenize"].as_array().expect("tokenize cases") {
        let want = case["detokenized"].as_str().expect("detokenized");
        let mut dec = StreamDecoder::new();
        let mut out = String::new();
        let mut held = false;
        for id in ids(&case["ids"]) {
            let piece = dec.push(tok, id).expect("push");
            assert!(!piece.contains('\u{FFFD}'), "{want:?}: partial char leaked");
            held |= dec.has_pending();
            out.push_str(&piece);
        }
        assert!(!dec.has_pending());
        out.push_str(&dec.finish());
        assert_eq!(out, want);
        // The emoji and CJK cases do split characters across tokens.
        if want.contains('🚀') || want.contains('日') {
            assert!(held, "{want:?} should have needed holding");
        }
    }
}

#[test]
fn stream_decoder_skips_special_when_asked() {
    let tok = tokenizer();
    let ids = tok.encode("<|im_start|>assistant\nHi<|im_end|>", true).expect("encode");
    let mut dec = StreamDecoder::skipping_special();
    let text: String = ids.iter().map(|&id| dec.push(tok, id).expect("push")).collect();
    assert_eq!(text, "assistant\nHi");
}

#[test]
fn stream_decoder_flushes_invalid_bytes() {
    let mut dec = StreamDecoder::new();
    assert_eq!(dec.push_bytes(&[0xF0, 0x9F]), "");
    assert!(dec.has_pending());
    // The next byte cannot continue the sequence: it is broken, not merely unfinished.
    assert_eq!(dec.push_bytes(b"a"), "\u{FFFD}a");
    assert!(!dec.has_pending());
    assert_eq!(dec.push_bytes(&[0xFF, b'b', 0xE6]), "\u{FFFD}b");
    assert_eq!(dec.finish(), "\u{FFFD}");
    assert_eq!(dec.push_bytes(&[0xE6, 0x97]), "");
    assert_eq!(dec.push_bytes(&[0xA5]), "日");
}

// ---- synthetic vocabularies: no download needed -------------------------------------

fn strings(v: &[&str]) -> MetaValue {
    MetaValue::array(v.iter().map(|s| MetaValue::String(s.to_string())).collect())
}

/// A tiny byte-level BPE: the printable ASCII bytes, "Ġ" (space), a few merges and
/// three special tokens of different kinds.
fn tiny_gguf(model: &str, pre: Option<&str>) -> Vec<u8> {
    let mut tokens: Vec<String> = vec!["<s>".into(), "</s>".into(), "<tool>".into()];
    tokens.extend((b'!'..=b'~').map(|b| (b as char).to_string()));
    tokens.extend(["Ġ", "Ġa", "ab", "Ġab"].map(String::from));
    let mut types = vec![3, 3, 4];
    types.resize(tokens.len(), 1);
    let token_refs: Vec<&str> = tokens.iter().map(|s| s.as_str()).collect();
    let mut b = GgufBuilder::new()
        .meta("tokenizer.ggml.model", MetaValue::String(model.into()))
        .meta("tokenizer.ggml.tokens", strings(&token_refs))
        .meta("tokenizer.ggml.token_type", MetaValue::array(types.into_iter().map(MetaValue::I32).collect()))
        .meta("tokenizer.ggml.merges", strings(&["Ġ a", "a b", "Ġa b"]))
        .meta("tokenizer.ggml.bos_token_id", MetaValue::U32(0))
        .meta("tokenizer.ggml.eos_token_id", MetaValue::U32(1))
        .meta("tokenizer.ggml.add_bos_token", MetaValue::Bool(true));
    if let Some(pre) = pre {
        b = b.meta("tokenizer.ggml.pre", MetaValue::String(pre.into()));
    }
    b.build()
}

fn tiny(pre: Option<&str>) -> Result<Tokenizer, TokenizerError> {
    let bytes = tiny_gguf("gpt2", pre);
    Tokenizer::from_metadata(&Gguf::parse(&bytes).expect("parse"))
}

#[test]
fn synthetic_bpe_merges_and_specials() {
    let tok = tiny(Some("gpt2")).expect("build");
    let id = |s: &str| 3 + (s.as_bytes()[0] - b'!') as u32;
    let (sp, sp_a, ab, sp_ab) = (97, 98, 99, 100);
    assert_eq!(tok.vocab_size(), 101);
    assert_eq!(tok.encode("ab ab a", false).expect("encode"), vec![ab, sp_ab, sp_a]);
    assert_eq!(tok.encode("b  a", false).expect("encode"), vec![id("b"), sp, sp_a]);
    // Control tokens only with parse_special; user-defined ones always.
    assert_eq!(tok.encode("<s>ab", true).expect("encode"), vec![0, ab]);
    assert_eq!(tok.encode("<s>ab", false).expect("encode"), vec![id("<"), id("s"), id(">"), ab]);
    assert_eq!(tok.encode("a<tool>b", false).expect("encode"), vec![id("a"), 2, id("b")]);
    assert_eq!(tok.encode_with_special("ab", false).expect("encode"), vec![0, ab]);
    assert!(tok.add_bos());
    assert_eq!(tok.decode(&[0, sp_ab, 2]).expect("decode"), "<s> ab<tool>");
    assert!(tok.is_special(0) && tok.is_special(1) && !tok.is_special(2));
    assert_eq!(tok.eog_ids(), &[1]);
}

#[test]
fn synthetic_pre_tokenizers() {
    // Every supported family builds and round-trips; digits split one by one for smollm.
    for pre in [None, Some("smollm"), Some("gpt-2"), Some("llama-bpe"), Some("qwen2"), Some("default")] {
        let tok = tiny(pre).unwrap_or_else(|e| panic!("{pre:?}: {e}"));
        let ids = tok.encode("ab 123 a!?", false).expect("encode");
        assert_eq!(tok.decode(&ids).expect("decode"), "ab 123 a!?", "{pre:?}");
    }
    let smollm = tiny(Some("smollm")).expect("build");
    let ids = smollm.encode("123", false).expect("encode");
    assert_eq!(ids.len(), 3);
}

#[test]
fn unsupported_vocabularies_are_clear_errors() {
    let bytes = tiny_gguf("bert", None);
    let err = Tokenizer::from_metadata(&Gguf::parse(&bytes).expect("parse")).expect_err("must fail");
    assert_eq!(err, TokenizerError::UnsupportedModel("bert".into()));
    assert!(err.to_string().contains("bert"));

    let err = tiny(Some("no-such-pre")).expect_err("must fail");
    assert_eq!(err, TokenizerError::UnsupportedPreTokenizer("no-such-pre".into()));

    let bytes = GgufBuilder::new().build();
    let err = Tokenizer::from_metadata(&Gguf::parse(&bytes).expect("parse")).expect_err("must fail");
    assert_eq!(err, TokenizerError::MissingKey("tokenizer.ggml.model"));

    let bytes = GgufBuilder::new()
        .meta("tokenizer.ggml.model", MetaValue::String("gpt2".into()))
        .meta("tokenizer.ggml.tokens", strings(&["a", "b"]))
        .meta("tokenizer.ggml.merges", strings(&["a b"]))
        .build();
    let err = Tokenizer::from_metadata(&Gguf::parse(&bytes).expect("parse")).expect_err("must fail");
    assert!(matches!(err, TokenizerError::BadMetadata { .. }), "{err}");
}

#[test]
fn perplexity_text_token_count_matches() {
    // The reference's perplexity text is a file every Debian system has; llama.cpp
    // tokenized all of it (no BOS, no special parsing) into `n_tokens` tokens.
    use sha2::{Digest, Sha256};
    let tok = tokenizer();
    let reference = common::reference();
    for case in reference["perplexity"].as_array().expect("perplexity") {
        let path = case["source"].as_str().and_then(|s| s.split(", ").nth(1)).expect("source path");
        let Ok(text) = std::fs::read(path) else {
            eprintln!("skipped: {path} is not on this system");
            continue;
        };
        let sha: String = Sha256::digest(&text).iter().map(|b| format!("{b:02x}")).collect();
        if sha != case["text_sha256"].as_str().expect("sha") {
            eprintln!("skipped: {path} differs from the reference's copy");
            continue;
        }
        let text = String::from_utf8(text).expect("utf-8 text");
        let t0 = std::time::Instant::now();
        let ids = tok.encode(&text, false).expect("encode");
        eprintln!("{} bytes → {} tokens in {:?}", text.len(), ids.len(), t0.elapsed());
        assert_eq!(ids.len() as u64, case["n_tokens"].as_u64().expect("n_tokens"));
        assert_eq!(tok.decode(&ids).expect("decode"), text);
    }
}
