//! Text ↔ token ids, built from the vocabulary a GGUF file carries.
//!
//! The goal is to reproduce llama.cpp's ids exactly, because every reference test (and
//! every prompt cache a user may share between runtimes) depends on them. Work is split
//! in two layers:
//!
//! * this module owns what all vocabularies share: token types, the bytes each token
//!   stands for ("pieces"), special-token splitting, BOS/EOS/end-of-generation ids and
//!   streaming detokenization;
//! * [`Model`] owns the part that differs per `tokenizer.ggml.model`. Today that is GPT-2
//!   style byte-level BPE (`"gpt2"`), run by the `tokenizers` crate; SentencePiece
//!   (`"llama"`) is meant to become a second variant.
//!
//! Special tokens are split out of the text here rather than registered as added tokens
//! in `tokenizers`, because llama.cpp decides per call (`parse_special`) whether control
//! tokens written in the text count as tokens, and `tokenizers` only has a per-instance
//! switch for that.

use std::fmt;
use std::sync::OnceLock;

use cairn_formats::{Gguf, MetaValue};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{PreTokenizerWrapper, SplitDelimiterBehavior};

/// Why a tokenizer could not be built or could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerError {
    /// A metadata key every tokenizer needs is absent.
    MissingKey(&'static str),
    /// A metadata key is present but its value has the wrong type or shape.
    BadMetadata { key: &'static str, reason: String },
    /// `tokenizer.ggml.model` names a kind of tokenizer Cairn does not implement (yet).
    UnsupportedModel(String),
    /// `tokenizer.ggml.pre` names a pre-tokenizer Cairn does not know; guessing one
    /// would silently give ids the model was never trained on.
    UnsupportedPreTokenizer(String),
    /// The `tokenizers` crate refused the vocabulary or failed while encoding.
    Backend(String),
    /// A token id is not in the vocabulary.
    TokenOutOfRange { id: u32, vocab_size: usize },
}

impl fmt::Display for TokenizerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingKey(k) => write!(f, "tokenizer metadata `{k}` is missing"),
            Self::BadMetadata { key, reason } => {
                write!(f, "tokenizer metadata `{key}` is invalid: {reason}")
            }
            Self::UnsupportedModel(m) => {
                write!(f, "tokenizer model `{}` is not supported (supported: `gpt2` byte-level BPE)", one_line(m, 64))
            }
            Self::UnsupportedPreTokenizer(p) => {
                write!(f, "byte-level BPE pre-tokenizer `{}` is not supported", one_line(p, 64))
            }
            Self::Backend(e) => write!(f, "tokenizer error: {}", one_line(e, 300)),
            Self::TokenOutOfRange { id, vocab_size } => {
                write!(f, "token id {id} is out of range (vocabulary has {vocab_size} tokens)")
            }
        }
    }
}

impl std::error::Error for TokenizerError {}

/// Text that may come from the model file (a token, a name), as an error shows it: control
/// characters escaped and at most `max` characters, so that the error stays one line.
fn one_line(s: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == max {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

impl From<TokenizerError> for crate::Error {
    fn from(e: TokenizerError) -> Self {
        crate::Error::Text(e.to_string())
    }
}

type Result<T> = std::result::Result<T, TokenizerError>;

/// A token's type, as GGUF's `tokenizer.ggml.token_type` (llama.cpp's numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    Undefined,
    Normal,
    Unknown,
    /// Structural tokens (`<|im_start|>`, `<|endoftext|>`): only ever produced from text
    /// when the caller asks for special tokens to be parsed.
    Control,
    /// Tokens added by hand to a vocabulary: always matched in text as a whole.
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_gguf(v: i64) -> TokenType {
        match v {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Undefined,
        }
    }
}

/// The vocabulary-specific encoder. One variant per `tokenizer.ggml.model`.
enum Model {
    /// GPT-2 style byte-level BPE (`tokenizer.ggml.model = "gpt2"`).
    Bpe(Box<tokenizers::Tokenizer>),
}

impl Model {
    /// Encode text that contains no special tokens (they are split off before).
    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        match self {
            Model::Bpe(t) => {
                let enc = t.encode_fast(text, false).map_err(|e| TokenizerError::Backend(e.to_string()))?;
                out.extend_from_slice(enc.get_ids());
                Ok(())
            }
        }
    }
}

/// Special tokens (control, unknown and user-defined) found in text by leftmost-longest
/// matching, as `tokenizers` does and as llama.cpp does in every practical case.
struct SpecialMatcher {
    /// (text, id, matched even when `parse_special` is false)
    tokens: Vec<(String, u32, bool)>,
    /// For each first byte, indices into `tokens`, longest text first.
    by_first_byte: Vec<Vec<u32>>,
}

impl SpecialMatcher {
    fn new(mut tokens: Vec<(String, u32, bool)>) -> SpecialMatcher {
        tokens.retain(|(t, _, _)| !t.is_empty());
        let mut by_first_byte = vec![Vec::new(); 256];
        for (i, (t, _, _)) in tokens.iter().enumerate() {
            by_first_byte[t.as_bytes()[0] as usize].push(i as u32);
        }
        for list in &mut by_first_byte {
            list.sort_by_key(|&i| std::cmp::Reverse(tokens[i as usize].0.len()));
        }
        SpecialMatcher { tokens, by_first_byte }
    }

    /// The special token starting at byte `pos`, if any: (length in bytes, id).
    fn match_at(&self, text: &[u8], pos: usize, parse_special: bool) -> Option<(usize, u32)> {
        let rest = &text[pos..];
        self.by_first_byte[rest[0] as usize].iter().find_map(|&i| {
            let (t, id, always) = &self.tokens[i as usize];
            ((*always || parse_special) && rest.starts_with(t.as_bytes())).then_some((t.len(), *id))
        })
    }
}

/// A tokenizer for one model's vocabulary. Immutable once built, so one instance can be
/// shared by every session of a model (it is `Send + Sync`).
pub struct Tokenizer {
    model: Model,
    types: Vec<TokenType>,
    /// The bytes of every token, concatenated; token `i` is
    /// `pieces[piece_ends[i-1]..piece_ends[i]]`. One buffer instead of one `Vec` per token
    /// keeps a 262k vocabulary to a couple of allocations.
    pieces: Vec<u8>,
    piece_ends: Vec<u32>,
    specials: SpecialMatcher,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    eog: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
}

/// Token texts llama.cpp treats as end-of-generation whatever the metadata says:
/// chat models often mark the end of a turn with one of these rather than with EOS.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];

/// Texts llama.cpp picks the end-of-turn token from when `eot_token_id` is absent, in
/// order of preference.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];

fn meta_array<'g>(gguf: &'g Gguf, key: &'static str) -> Result<Option<&'g [MetaValue]>> {
    match gguf.get(key) {
        None => Ok(None),
        Some(v) => {
            v.as_array().map(Some).ok_or(TokenizerError::BadMetadata { key, reason: "expected an array".into() })
        }
    }
}

fn meta_strings<'g>(gguf: &'g Gguf, key: &'static str) -> Result<Option<Vec<&'g str>>> {
    let Some(arr) = meta_array(gguf, key)? else {
        return Ok(None);
    };
    arr.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str()
                .ok_or_else(|| TokenizerError::BadMetadata { key, reason: format!("element {i} is not a string") })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// A token id from metadata; ids outside the vocabulary (some converters write -1 or a
/// stale id) are treated as absent rather than failing the whole model.
fn meta_id(gguf: &Gguf, key: &str, n_vocab: usize) -> Option<u32> {
    let v = gguf.get(key)?.as_u64()?;
    if (v as usize) < n_vocab {
        Some(v as u32)
    } else {
        log::warn!("{key} = {v} is outside the vocabulary ({n_vocab} tokens); ignored");
        None
    }
}

/// The GPT-2 byte ↔ character table inverted: for each char code below 324, the byte it
/// stands for (-1 where none). Byte-level BPE writes every byte as a printable char.
fn byte_level_decode_table() -> &'static [i16; 324] {
    static TABLE: OnceLock<[i16; 324]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [-1i16; 324];
        let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let mut n = 0;
        for b in 0..=255u8 {
            if printable(b) {
                t[b as usize] = b as i16;
            } else {
                t[256 + n] = b as i16;
                n += 1;
            }
        }
        t
    })
}

/// Bytes a byte-level BPE token stands for. A char outside the table (a malformed
/// vocabulary) is kept as its UTF-8 bytes instead of being dropped.
fn byte_level_decode(token: &str, out: &mut Vec<u8>) {
    let table = byte_level_decode_table();
    for c in token.chars() {
        match table.get(c as usize) {
            Some(&b) if b >= 0 => out.push(b as u8),
            _ => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
}

/// Regexes of llama.cpp's byte-level pre-tokenizers, applied one after another; every
/// match and every gap between matches becomes its own word.
const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer for a `tokenizer.ggml.pre` value, and whether whole words found in
/// the vocabulary skip the merges (llama.cpp's `ignore_merges`, set for llama3).
fn bpe_pre_tokenizer(pre: &str) -> Result<(PreTokenizerWrapper, bool)> {
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        Split::new(SplitPattern::Regex(re.to_string()), SplitDelimiterBehavior::Isolated, false)
            .map(PreTokenizerWrapper::Split)
            .map_err(|e| TokenizerError::Backend(e.to_string()))
    };
    // The regexes already split into words; ByteLevel only maps bytes to chars.
    let byte_level = || PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false));
    let seq = |v: Vec<PreTokenizerWrapper>| PreTokenizerWrapper::Sequence(Sequence::new(v));
    Ok(match pre {
        // Digits one by one, then the GPT-2 regex (ByteLevel's own regex is the same).
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => (
            seq(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, true)),
            ]),
            false,
        ),
        "gpt2" | "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" | "trillion" | "granite-docling" | "roberta-bpe"
        | "jina-es" | "jina-de" | "jina-v1-en" | "jina-v2-es" | "jina-v2-de" | "jina-v2-code" | "gigachat" => {
            (PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, true)), false)
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2" | "dbrx"
        | "smaug-bpe" => (seq(vec![split(RE_LLAMA3)?, byte_level()]), true),
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "hunyuan" | "megrez" => {
            (seq(vec![split(RE_QWEN2)?, byte_level()]), false)
        }
        // llama.cpp's fallback when a converter did not name a pre-tokenizer.
        "default" => (
            seq(vec![
                split(r"[\p{P}\$\+<=>\^~\|]+")?,
                split(RE_GPT2)?,
                split(r"\p{N}+")?,
                split(r"[0-9][0-9][0-9]")?,
                byte_level(),
            ]),
            false,
        ),
        other => return Err(TokenizerError::UnsupportedPreTokenizer(other.to_string())),
    })
}

fn build_bpe(gguf: &Gguf, tokens: &[&str], pre: &str) -> Result<Model> {
    let merges =
        meta_strings(gguf, "tokenizer.ggml.merges")?.ok_or(TokenizerError::MissingKey("tokenizer.ggml.merges"))?;
    // `tokenizers` panics on a merge longer than every token, so refuse that here.
    let max_len = tokens.iter().map(|t| t.len()).max().unwrap_or(0);
    // Split at the first space after the first byte, as llama.cpp does, so that a
    // (non-byte-level) token that starts with a space still parses.
    let merges = merges
        .iter()
        .map(|m| {
            let pos = m.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1);
            let bad = |why: &str| TokenizerError::BadMetadata {
                key: "tokenizer.ggml.merges",
                reason: format!("merge {m:?} {why}"),
            };
            let p = pos.ok_or_else(|| bad("has no space"))?;
            if m.len() - 1 > max_len {
                return Err(bad("makes a token that is not in the vocabulary"));
            }
            Ok((m[..p].to_string(), m[p + 1..].to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    // Later duplicates win, as in llama.cpp's token → id map.
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect();
    let (pre_tokenizer, ignore_merges) = bpe_pre_tokenizer(pre)?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| TokenizerError::Backend(e.to_string()))?;
    let mut t = tokenizers::Tokenizer::new(bpe);
    t.with_pre_tokenizer(Some(pre_tokenizer));
    Ok(Model::Bpe(Box::new(t)))
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.model {
            Model::Bpe(_) => "byte-level BPE",
        };
        f.debug_struct("Tokenizer")
            .field("model", &kind)
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eog", &self.eog)
            .field("add_bos", &self.add_bos)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Build the tokenizer a GGUF file describes.
    pub fn from_gguf(gguf: &Gguf) -> Result<Tokenizer> {
        let kind = gguf.get_str("tokenizer.ggml.model").ok_or(TokenizerError::MissingKey("tokenizer.ggml.model"))?;
        if kind != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(kind.to_string()));
        }
        let tokens =
            meta_strings(gguf, "tokenizer.ggml.tokens")?.ok_or(TokenizerError::MissingKey("tokenizer.ggml.tokens"))?;
        let n = tokens.len();
        if n == 0 || n > u32::MAX as usize {
            return Err(TokenizerError::BadMetadata { key: "tokenizer.ggml.tokens", reason: format!("{n} tokens") });
        }
        let mut types = match meta_array(gguf, "tokenizer.ggml.token_type")? {
            None => vec![TokenType::Normal; n],
            Some(a) if a.len() == n => a.iter().map(|v| TokenType::from_gguf(v.as_i64().unwrap_or(0))).collect(),
            Some(a) => {
                return Err(TokenizerError::BadMetadata {
                    key: "tokenizer.ggml.token_type",
                    reason: format!("{} entries for {n} tokens", a.len()),
                })
            }
        };

        let pre = gguf.get_str("tokenizer.ggml.pre").unwrap_or_else(|| {
            log::warn!("GGUF names no pre-tokenizer (tokenizer.ggml.pre); using llama.cpp's default");
            "default"
        });
        let model = build_bpe(gguf, &tokens, pre)?;

        let bos = meta_id(gguf, "tokenizer.ggml.bos_token_id", n);
        let eos = meta_id(gguf, "tokenizer.ggml.eos_token_id", n);
        let eom = meta_id(gguf, "tokenizer.ggml.eom_token_id", n);
        let mut eot = meta_id(gguf, "tokenizer.ggml.eot_token_id", n);
        if eot.is_none() {
            // The earliest text in the list wins (llama.cpp takes whichever its hash map
            // yields first, which is arbitrary when a vocabulary has several).
            let rank = |t: &str| EOT_TEXTS.iter().position(|e| *e == t);
            eot = (0..n).filter_map(|i| rank(tokens[i]).map(|r| (r, i as u32))).min().map(|(_, i)| i);
        }
        let mut eog: Vec<u32> = tokens
            .iter()
            .enumerate()
            .filter(|(_, t)| EOG_TEXTS.contains(t))
            .map(|(i, _)| i as u32)
            .chain(eos)
            .chain(eot)
            .chain(eom)
            .collect();
        eog.sort_unstable();
        eog.dedup();
        // An end-of-generation token must never be produced from plain text, so llama.cpp
        // promotes it to a control token whatever the file says.
        for &id in &eog {
            if types[id as usize] != TokenType::Control {
                log::debug!("end-of-generation token {:?} promoted to a control token", tokens[id as usize]);
                types[id as usize] = TokenType::Control;
            }
        }

        let mut pieces = Vec::with_capacity(tokens.iter().map(|t| t.len()).sum());
        let mut piece_ends = Vec::with_capacity(n);
        let mut specials = Vec::new();
        for (i, (t, ty)) in tokens.iter().zip(&types).enumerate() {
            match ty {
                TokenType::Control | TokenType::Unknown | TokenType::UserDefined => {
                    pieces.extend_from_slice(t.as_bytes());
                    specials.push((t.to_string(), i as u32, *ty == TokenType::UserDefined));
                }
                TokenType::Unused => {}
                _ => byte_level_decode(t, &mut pieces),
            }
            piece_ends.push(u32::try_from(pieces.len()).map_err(|_| TokenizerError::BadMetadata {
                key: "tokenizer.ggml.tokens",
                reason: "vocabulary text exceeds 4 GiB".into(),
            })?);
        }

        let flag = |key: &str, default: bool| gguf.get(key).and_then(MetaValue::as_bool).unwrap_or(default);
        Ok(Tokenizer {
            model,
            types,
            pieces,
            piece_ends,
            specials: SpecialMatcher::new(specials),
            bos,
            eos,
            eot,
            eog,
            add_bos: flag("tokenizer.ggml.add_bos_token", false) && bos.is_some(),
            add_eos: flag("tokenizer.ggml.add_eos_token", false) && eos.is_some(),
        })
    }

    /// Text to ids, without BOS/EOS. With `parse_special`, control tokens written in the
    /// text (`<|im_start|>`) become their ids; without it they are tokenized as plain
    /// text, which is what untrusted user input needs. User-defined tokens are always
    /// matched whole.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        let bytes = text.as_bytes();
        let mut start = 0;
        let mut pos = 0;
        while pos < bytes.len() {
            if let Some((len, id)) = self.specials.match_at(bytes, pos, parse_special) {
                if start < pos {
                    self.model.encode_plain(&text[start..pos], &mut out)?;
                }
                out.push(id);
                pos += len;
                start = pos;
            } else {
                pos += 1;
            }
        }
        if start < bytes.len() {
            self.model.encode_plain(&text[start..], &mut out)?;
        }
        Ok(out)
    }

    /// Like [`encode`](Self::encode), then BOS/EOS added as the model's metadata asks
    /// (llama.cpp's `add_special`). Use this for raw prompts fed straight to the model.
    pub fn encode_with_special(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if let (true, Some(bos)) = (self.add_bos, self.bos) {
            ids.push(bos);
        }
        ids.extend(self.encode(text, parse_special)?);
        if let (true, Some(eos)) = (self.add_eos, self.eos) {
            ids.push(eos);
        }
        Ok(ids)
    }

    /// Ids to text. Special tokens are rendered as their text; bytes that do not form
    /// valid UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            bytes.extend_from_slice(self.token_to_piece(id)?);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The raw bytes a token stands for (byte-level decoded). A token may hold part of a
    /// UTF-8 character; see [`StreamDecoder`] for joining them. Special tokens give
    /// their text, unused tokens nothing.
    pub fn token_to_piece(&self, id: u32) -> Result<&[u8]> {
        let i = self.check(id)?;
        let start = if i == 0 { 0 } else { self.piece_ends[i - 1] as usize };
        Ok(&self.pieces[start..self.piece_ends[i] as usize])
    }

    fn check(&self, id: u32) -> Result<usize> {
        let i = id as usize;
        if i < self.types.len() {
            Ok(i)
        } else {
            Err(TokenizerError::TokenOutOfRange { id, vocab_size: self.types.len() })
        }
    }

    /// Number of tokens in the vocabulary (the model's logits may be padded beyond it).
    pub fn vocab_size(&self) -> usize {
        self.types.len()
    }

    /// The token's type; `None` for ids outside the vocabulary.
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    /// Whether the token is a control (or unknown) token: structure, not text. Such
    /// tokens are only produced from text with `parse_special`.
    pub fn is_special(&self, id: u32) -> bool {
        matches!(self.token_type(id), Some(TokenType::Control | TokenType::Unknown))
    }

    /// Whether the model's metadata asks for BOS in front of a raw prompt.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether the model's metadata asks for EOS after a raw prompt.
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// The end-of-turn token (`tokenizer.ggml.eot_token_id`, or a well-known text such as
    /// `<|im_end|>`).
    pub fn eot_id(&self) -> Option<u32> {
        self.eot
    }

    /// Every token that ends generation (EOS, EOT, EOM and the well-known end texts
    /// llama.cpp recognises), sorted.
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog
    }

    /// Whether generation should stop after this token.
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }
}

/// Turns ids produced one at a time into text, holding back bytes until they form whole
/// UTF-8 characters: byte-level BPE often splits an emoji or a CJK character across
/// tokens, and printing each half alone would show U+FFFD.
///
/// It does not borrow the [`Tokenizer`], so that it can live in a session next to one.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    pending: Vec<u8>,
    skip_special: bool,
}

impl StreamDecoder {
    /// A decoder that renders every token, special ones included (like
    /// [`Tokenizer::decode`]).
    pub fn new() -> StreamDecoder {
        StreamDecoder::default()
    }

    /// A decoder that drops control tokens: what a chat front end shows a user.
    pub fn skipping_special() -> StreamDecoder {
        StreamDecoder { pending: Vec::new(), skip_special: true }
    }

    /// Feed one id; returns the text that became complete (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        let piece = tokenizer.token_to_piece(id)?;
        if self.skip_special && tokenizer.is_special(id) {
            return Ok(String::new());
        }
        Ok(self.push_bytes(piece))
    }

    /// Feed raw bytes; returns the text that became complete. Bytes that can never
    /// become valid UTF-8 are emitted as U+FFFD at once, so nothing gets stuck; only an
    /// incomplete character at the very end is held.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // `valid_up_to` marks a valid prefix, so this never falls back.
                    out.push_str(std::str::from_utf8(&rest[..valid]).unwrap_or_default());
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &rest[valid + bad..];
                        }
                        None => {
                            rest = &rest[valid..];
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let drain = self.pending.len() - keep;
        self.pending.drain(..drain);
        out
    }

    /// Whether bytes of an unfinished character are held.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Flush whatever is held (an unfinished character becomes U+FFFD). Call at the end
    /// of generation.
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}
