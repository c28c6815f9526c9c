//! The SentencePiece tokenizer (`tokenizer.ggml.model = "llama"`) against llama.cpp's ids
//! on Gemma-3-270M, plus merges, byte fallback and malformed metadata on small synthetic
//! vocabularies.

mod common;

use common::{gemma_path, gemma_reference};

use std::sync::OnceLock;

use cairn::tokenizer::{StreamDecoder, TokenType, Tokenizer, TokenizerError};
use cairn::weights::ModelFile;
use cairn_formats::{Gguf, GgufBuilder, MetaValue};
use serde_json::Value;

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let file = ModelFile::open(&gemma_path()).expect("open gemma");
        let t0 = std::time::Instant::now();
        let tok = Tokenizer::from_metadata(&file.metadata).expect("build tokenizer");
        let took = t0.elapsed();
        eprintln!("gemma tokenizer built in {took:?}");
        // A generous bound against regressions (typically well under 0.5 s), not a benchmark.
        assert!(took.as_secs_f64() < 2.0, "building the tokenizer took {took:?}");
        tok
    })
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("id array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

#[test]
fn reference_tokenize_cases() {
    let tok = tokenizer();
    let reference = gemma_reference();
    let cases = reference["tokenize"].as_array().expect("tokenize cases");
    assert!(!cases.is_empty());
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let parse_special = case["parse_special"].as_bool().expect("parse_special");
        let want = ids(&case["ids"]);
        assert_eq!(tok.encode(text, parse_special).expect("encode"), want, "ids of {text:?}");
        let detok = case["detokenized"].as_str().expect("detokenized");
        assert_eq!(tok.decode(&want).expect("decode"), detok, "text of {want:?}");

        // Streaming gives the same text and never leaks half a character.
        let mut dec = StreamDecoder::new();
        let mut out = String::new();
        for &id in &want {
            let piece = dec.push(tok, id).expect("push");
            assert!(!piece.contains('\u{FFFD}'), "{detok:?}: partial char leaked");
            out.push_str(&piece);
        }
        out.push_str(&dec.finish());
        assert_eq!(out, detok);
    }
}

#[test]
fn reference_prompt_ids_and_greedy_text() {
    let tok = tokenizer();
    let reference = gemma_reference();
    let bos = tok.bos_id().expect("bos");
    for seq in reference["sequences"].as_array().expect("sequences") {
        let name = seq["name"].as_str().unwrap_or("?");
        let rendered = seq["rendered"].as_str().expect("rendered");
        let want = ids(&seq["prompt_ids"]);
        // llama.cpp's prompt ids carry the BOS the metadata asks for.
        let mut got = vec![bos];
        got.extend(tok.encode(rendered, true).expect("encode"));
        assert_eq!(got, want, "prompt ids of {name}");
        assert_eq!(tok.encode_with_special(rendered, true).expect("encode"), want, "{name}");
        assert_eq!(tok.decode(&want[1..]).expect("decode"), rendered, "prompt text of {name}");

        // llama.cpp's continuation text is its ids decoded, minus a stop token.
        let mut greedy = ids(&seq["greedy_ids"]);
        if greedy.last().is_some_and(|&t| tok.is_eog(t)) {
            greedy.pop();
        }
        let text = seq["greedy_text"].as_str().expect("greedy_text");
        assert_eq!(tok.decode(&greedy).expect("decode"), text, "greedy text of {name}");
    }
}

#[test]
fn special_ids_match_gemma_reference() {
    let tok = tokenizer();
    let reference = gemma_reference();
    assert_eq!(tok.vocab_size(), 262_144);
    assert_eq!(tok.bos_id(), Some(2));
    assert_eq!(tok.eos_id(), reference["eos_id"].as_u64().map(|x| x as u32));
    assert_eq!(tok.eot_id(), Some(106), "<end_of_turn>");
    assert_eq!(tok.unk_id(), Some(3));
    assert_eq!(tok.eog_ids(), ids(&reference["stop_ids"]).as_slice());
    assert!(tok.add_bos());
    assert!(!tok.add_eos());
    assert!(!tok.add_space_prefix(), "Gemma 3 sets tokenizer.ggml.add_space_prefix = false");
    assert_eq!(tok.token_to_piece(106).expect("piece"), b"<end_of_turn>");
    assert!(tok.is_special(105) && tok.is_special(106));
    // "\n" is a user-defined token: always split out, but not special.
    assert_eq!(tok.token_type(107), Some(TokenType::UserDefined));
    assert!(!tok.is_special(107));
    // "▁" stands for a space; byte tokens for their byte.
    let space_the = tok.encode(" the", false).expect("encode");
    assert_eq!(space_the.len(), 1);
    assert_eq!(tok.token_to_piece(space_the[0]).expect("piece"), b" the");
    assert_eq!(tok.encode("▁", false).expect("encode"), tok.encode(" ", false).expect("encode"));
    let b0d = tok.encode("\r", false).expect("encode");
    assert_eq!(tok.token_type(b0d[0]), Some(TokenType::Byte));
    assert_eq!(tok.token_to_piece(b0d[0]).expect("piece"), b"\r");
}

#[test]
fn parse_special_off_treats_markup_as_text() {
    let tok = tokenizer();
    let text = "<start_of_turn>user\nHi<end_of_turn>";
    let with = tok.encode(text, true).expect("encode");
    let without = tok.encode(text, false).expect("encode");
    assert_eq!(with[0], 105);
    assert!(without.iter().all(|&t| !tok.is_special(t)), "{without:?}");
    assert!(without.len() > with.len());
    assert_eq!(tok.decode(&without).expect("decode"), text);
    assert_eq!(tok.decode(&with).expect("decode"), text);
}

#[test]
fn byte_fallback_round_trips_and_streams() {
    let tok = tokenizer();
    // A private-use character no vocabulary has: four byte tokens.
    let ids = tok.encode("a\u{10FFFD}b", false).expect("encode");
    assert_eq!(ids.len(), 6, "{ids:?}");
    assert!(ids[1..5].iter().all(|&t| tok.token_type(t) == Some(TokenType::Byte)), "{ids:?}");
    assert_eq!(tok.decode(&ids).expect("decode"), "a\u{10FFFD}b");
    let mut dec = StreamDecoder::new();
    let mut out = String::new();
    for (i, &id) in ids.iter().enumerate() {
        out.push_str(&dec.push(tok, id).expect("push"));
        assert_eq!(dec.has_pending(), (1..4).contains(&i), "after token {i}");
    }
    assert_eq!(out, "a\u{10FFFD}b");

    for text in ["", " ", "\n\n\n", "  x  ", "tab\tand\u{0}nul", "ümlaut 0123 ١٢٣ ½", "mixed 中文 and עברית, ok?"]
    {
        let ids = tok.encode(text, true).expect("encode");
        assert_eq!(tok.decode(&ids).expect("decode"), text, "{ids:?}");
    }
}

#[test]
fn perplexity_text_token_count_matches() {
    // The reference's perplexity text is a file every Debian system has; llama.cpp
    // tokenized all of it (no BOS, no special parsing) into `n_tokens` tokens.
    use sha2::{Digest, Sha256};
    let tok = tokenizer();
    let reference = gemma_reference();
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

// ---- synthetic vocabularies: no download needed -------------------------------------

fn strings(v: &[&str]) -> MetaValue {
    MetaValue::array(v.iter().map(|s| MetaValue::String(s.to_string())).collect())
}

/// A tiny SentencePiece vocabulary: `<unk> <s> </s>`, the 256 byte tokens, then the
/// pieces below (ids from 259) with their scores, and a user-defined "\n".
const PIECES: &[(&str, f32)] =
    &[("▁", -1.0), ("a", -2.0), ("b", -2.0), ("c", -2.0), ("ab", -5.0), ("bc", -1.0), ("▁a", -3.0), ("\n", 0.0)];
const A: u32 = 260;
const B: u32 = 261;
const C: u32 = 262;
const AB: u32 = 263;
const BC: u32 = 264;
const SPACE_A: u32 = 265;
const NL: u32 = 266;

fn byte_id(b: u8) -> u32 {
    3 + b as u32
}

/// The vocabulary with each piece's score replaced where `scores` says, and the extra
/// metadata `extra`.
fn spm_gguf(scores: &[(&str, f32)], extra: &[(&str, MetaValue)]) -> Vec<u8> {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    let mut score_list = vec![0.0f32; 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        score_list.push(0.0);
    }
    for &(p, s) in PIECES {
        tokens.push(p.into());
        types.push(if p == "\n" { 4 } else { 1 });
        score_list.push(scores.iter().find(|(q, _)| *q == p).map_or(s, |&(_, s)| s));
    }
    let token_refs: Vec<&str> = tokens.iter().map(|s| s.as_str()).collect();
    let mut b = GgufBuilder::new()
        .meta("tokenizer.ggml.model", MetaValue::String("llama".into()))
        .meta("tokenizer.ggml.tokens", strings(&token_refs))
        .meta("tokenizer.ggml.token_type", MetaValue::array(types.into_iter().map(MetaValue::I32).collect()))
        .meta("tokenizer.ggml.scores", MetaValue::array(score_list.into_iter().map(MetaValue::F32).collect()));
    for (k, v) in extra {
        b = b.meta(k, v.clone());
    }
    b.build()
}

fn spm(scores: &[(&str, f32)], extra: &[(&str, MetaValue)]) -> Result<Tokenizer, TokenizerError> {
    Tokenizer::from_metadata(&Gguf::parse(&spm_gguf(scores, extra)).expect("parse"))
}

fn no_prefix() -> (&'static str, MetaValue) {
    ("tokenizer.ggml.add_space_prefix", MetaValue::Bool(false))
}

#[test]
fn synthetic_spm_merges_by_score() {
    let tok = spm(&[], &[no_prefix()]).expect("build");
    // "bc" (-1) outscores "ab" (-5), and "abc" is no piece: a + bc.
    assert_eq!(tok.encode("abc", false).expect("encode"), vec![A, BC]);
    // With "ab" scored higher it merges first, and "c" is left alone.
    let tok2 = spm(&[("ab", 0.0)], &[no_prefix()]).expect("build");
    assert_eq!(tok2.encode("abc", false).expect("encode"), vec![AB, C]);
    // Equal scores: the leftmost pair wins.
    let tie = spm(&[("ab", -1.0)], &[no_prefix()]).expect("build");
    assert_eq!(tie.encode("abc", false).expect("encode"), vec![AB, C]);
    // Spaces are "▁"; user-defined "\n" is split out before the merges.
    assert_eq!(tok.encode("b a\nc", false).expect("encode"), vec![B, SPACE_A, NL, C]);
    assert_eq!(tok.decode(&[B, SPACE_A, NL, C]).expect("decode"), "b a\nc");
    // Control tokens only with parse_special.
    assert_eq!(tok.encode("<s>a", true).expect("encode"), vec![1, A]);
    let as_text = tok.encode("<s>a", false).expect("encode");
    assert_eq!(as_text, vec![byte_id(b'<'), byte_id(b's'), byte_id(b'>'), A]);
    assert_eq!(tok.decode(&as_text).expect("decode"), "<s>a");
}

#[test]
fn synthetic_spm_byte_fallback() {
    let tok = spm(&[], &[no_prefix()]).expect("build");
    // "é" is not a piece: its two UTF-8 bytes become byte tokens.
    let ids = tok.encode("aéb", false).expect("encode");
    assert_eq!(ids, vec![A, byte_id(0xC3), byte_id(0xA9), B]);
    assert_eq!(tok.decode(&ids).expect("decode"), "aéb");
    let mut dec = StreamDecoder::new();
    assert_eq!(dec.push(&tok, ids[1]).expect("push"), "");
    assert!(dec.has_pending());
    assert_eq!(dec.push(&tok, ids[2]).expect("push"), "é");
}

#[test]
fn synthetic_spm_defaults_and_space_prefix() {
    // No add_space_prefix key: llama.cpp's default is true, so every run of text after
    // the start or a special token gets a "▁".
    let tok = spm(&[], &[]).expect("build");
    assert!(tok.add_space_prefix());
    assert_eq!(tok.encode("a", false).expect("encode"), vec![SPACE_A]);
    assert_eq!(tok.encode("a<s>a", true).expect("encode"), vec![SPACE_A, 1, SPACE_A]);
    // No id keys: <unk> 0, <s> 1, </s> 2, BOS added.
    assert_eq!((tok.unk_id(), tok.bos_id(), tok.eos_id()), (Some(0), Some(1), Some(2)));
    assert!(tok.add_bos());
    assert_eq!(tok.encode_with_special("a", false).expect("encode"), vec![1, SPACE_A]);
    assert_eq!(tok.eog_ids(), &[2]);

    let tok = spm(&[], &[no_prefix(), ("tokenizer.ggml.add_bos_token", MetaValue::Bool(false))]).expect("build");
    assert!(!tok.add_bos() && !tok.add_space_prefix());
    assert_eq!(tok.encode_with_special("a", false).expect("encode"), vec![A]);
}

#[test]
fn synthetic_spm_malformed_metadata_is_an_error() {
    let bad = |bytes: Vec<u8>| Tokenizer::from_metadata(&Gguf::parse(&bytes).expect("parse")).expect_err("must fail");

    // Scores of the wrong length.
    let bytes = GgufBuilder::new()
        .meta("tokenizer.ggml.model", MetaValue::String("llama".into()))
        .meta("tokenizer.ggml.tokens", strings(&["a", "b", "ab"]))
        .meta("tokenizer.ggml.scores", MetaValue::array(vec![MetaValue::F32(0.0); 2]))
        .build();
    let err = bad(bytes);
    assert!(matches!(err, TokenizerError::BadMetadata { key: "tokenizer.ggml.scores", .. }), "{err}");
    assert!(err.to_string().contains("2 entries for 3 tokens"), "{err}");

    // Scores that are not numbers.
    let bytes = GgufBuilder::new()
        .meta("tokenizer.ggml.model", MetaValue::String("llama".into()))
        .meta("tokenizer.ggml.tokens", strings(&["a"]))
        .meta("tokenizer.ggml.scores", strings(&["x"]))
        .build();
    assert!(matches!(bad(bytes), TokenizerError::BadMetadata { key: "tokenizer.ggml.scores", .. }));

    // A byte token that does not name a byte.
    let bytes = GgufBuilder::new()
        .meta("tokenizer.ggml.model", MetaValue::String("llama".into()))
        .meta("tokenizer.ggml.tokens", strings(&["a", "<0xZZ>"]))
        .meta("tokenizer.ggml.token_type", MetaValue::array(vec![MetaValue::I32(1), MetaValue::I32(6)]))
        .build();
    assert!(matches!(bad(bytes), TokenizerError::BadMetadata { key: "tokenizer.ggml.tokens", .. }));

    // No byte token and no unknown token for a character outside the vocabulary: an
    // error when encoding, not a panic.
    let bytes = GgufBuilder::new()
        .meta("tokenizer.ggml.model", MetaValue::String("llama".into()))
        .meta("tokenizer.ggml.tokens", strings(&["a", "b"]))
        .meta("tokenizer.ggml.unknown_token_id", MetaValue::I32(-1))
        .meta("tokenizer.ggml.add_space_prefix", MetaValue::Bool(false))
        .build();
    let tok = Tokenizer::from_metadata(&Gguf::parse(&bytes).expect("parse")).expect("build");
    assert_eq!(tok.encode("ab", false).expect("encode"), vec![0, 1]);
    assert!(tok.encode("aé", false).is_err());
}
