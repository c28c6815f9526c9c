//! Text ↔ token ids, built from the vocabulary a GGUF file carries.
//!
//! The goal is to reproduce llama.cpp's ids exactly, because every reference test (and
//! every prompt cache a user may share between runtimes) depends on them. Work is split
//! in two layers:
//!
//! * this module owns what all vocabularies share: token types, the bytes each token
//!   stands for ("pieces"), special-token splitting, BOS/EOS/end-of-generation ids and
//!   streaming detokenization;
//! * [`Model`] owns the part that differs per `tokenizer.ggml.model`: GPT-2 style
//!   byte-level BPE (`"gpt2"`, SmolLM2), run by the `tokenizers` crate, and
//!   SentencePiece-style BPE over characters with byte fallback (`"llama"`, Gemma 3),
//!   written here after llama.cpp's `llm_tokenizer_spm` because `tokenizers` merges by
//!   rank, not by score, and would give other ids.
//!
//! Special tokens are split out of the text here rather than registered as added tokens
//! in `tokenizers`, because llama.cpp decides per call (`parse_special`) whether control
//! tokens written in the text count as tokens, and `tokenizers` only has a per-instance
//! switch for that.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fmt;
use std::sync::OnceLock;

use cairn_formats::{MetaArray, MetaValue, Metadata};
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
                write!(
                    f,
                    "tokenizer model `{}` is not supported (supported: `gpt2` byte-level BPE, `llama` SentencePiece)",
                    one_line(m, 64)
                )
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
    /// SentencePiece-style BPE (`tokenizer.ggml.model = "llama"`).
    Spm(Box<Spm>),
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
            Model::Spm(spm) => spm.encode(text, out),
        }
    }
}

/// Every token's text → id, as one text buffer and an open-addressing table of ids:
/// a 262k vocabulary builds in a few milliseconds, without one allocation per token.
struct PieceIndex {
    text: String,
    /// Token `i` is `text[ends[i-1]..ends[i]]`.
    ends: Vec<u32>,
    /// Id + 1 of the token whose text hashes near here; 0 is empty. At most half full.
    slots: Vec<u32>,
}

impl PieceIndex {
    /// Later duplicates win, as in llama.cpp's map; empty texts are never looked up.
    fn new(tokens: &[&str]) -> Result<PieceIndex> {
        let mut text = String::with_capacity(tokens.iter().map(|t| t.len()).sum());
        let mut ends = Vec::with_capacity(tokens.len());
        for t in tokens {
            text.push_str(t);
            ends.push(u32::try_from(text.len()).map_err(|_| TokenizerError::BadMetadata {
                key: "tokenizer.ggml.tokens",
                reason: "vocabulary text exceeds 4 GiB".into(),
            })?);
        }
        let size = (tokens.len() * 2).next_power_of_two().max(2);
        let mut index = PieceIndex { text, ends, slots: vec![0; size] };
        for (id, t) in tokens.iter().enumerate() {
            if t.is_empty() {
                continue;
            }
            let slot = index.find(t);
            index.slots[slot] = id as u32 + 1;
        }
        Ok(index)
    }

    fn text(&self, id: u32) -> &str {
        let i = id as usize;
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.text[start..self.ends[i] as usize]
    }

    /// The slot holding `key`, or the empty slot where it would go.
    fn find(&self, key: &str) -> usize {
        let mask = self.slots.len() - 1;
        let mut i = fx_hash(key.as_bytes()) as usize & mask;
        loop {
            let s = self.slots[i];
            if s == 0 || self.text(s - 1) == key {
                return i;
            }
            i = (i + 1) & mask;
        }
    }

    fn get(&self, key: &str) -> Option<u32> {
        self.slots[self.find(key)].checked_sub(1)
    }
}

/// FxHash (rustc's), finished with a multiply and fold so that the low bits the table
/// uses depend on every input byte. The keys are the model's own pieces, so there is no
/// flooding to defend against.
fn fx_hash(bytes: &[u8]) -> u64 {
    const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;
    let mut h = 0u64;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        h = (h.rotate_left(5) ^ w).wrapping_mul(K);
    }
    for &b in chunks.remainder() {
        h = (h.rotate_left(5) ^ b as u64).wrapping_mul(K);
    }
    let h = (h ^ (h >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^ (h >> 32)
}

/// SentencePiece's stand-in for a space (U+2581), which its pieces are written with.
const SPM_SPACE: char = '\u{2581}';

/// SentencePiece-style BPE as llama.cpp's `llm_tokenizer_spm` runs it: the text (spaces
/// written as `▁`) starts as one symbol per character; the adjacent pair whose
/// concatenation is a piece with the highest score merges, again and again; each final
/// symbol is its piece, or, when the vocabulary lacks it, one byte token per byte.
struct Spm {
    /// Every token's text → id, whatever its type (llama.cpp merges into control pieces
    /// too); later duplicates win, as in llama.cpp's map.
    ids: PieceIndex,
    /// `tokenizer.ggml.scores`, with -0.0 made 0.0 so that `total_cmp` orders them as
    /// llama.cpp's `<` does.
    scores: Vec<f32>,
    /// The token each byte falls back to: `<0xXX>`, else the byte as a one-char piece,
    /// else the unknown token.
    byte_ids: [Option<u32>; 256],
    /// Whether each raw-text fragment gets a leading `▁` (`tokenizer.ggml.add_space_prefix`).
    add_space_prefix: bool,
}

/// A candidate merge of two adjacent symbols, ordered as llama.cpp's queue pops them:
/// highest score first, then leftmost.
struct Bigram {
    score: f32,
    left: u32,
    right: u32,
    /// Byte length of the merged text; a mismatch when popped means a side has changed.
    len: u32,
}

impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.total_cmp(&other.score).then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

/// A run of the escaped text; symbols form a linked list in text order.
#[derive(Clone, Copy)]
struct Symbol {
    start: u32,
    /// Byte length; 0 once merged into its left neighbour.
    len: u32,
    prev: u32,
    next: u32,
}

const NONE: u32 = u32::MAX;

impl Spm {
    fn new(meta: &dyn Metadata, tokens: &[&str], unk: Option<u32>) -> Result<Spm> {
        let n = tokens.len();
        const SCORES: &str = "tokenizer.ggml.scores";
        // llama.cpp scores every token 0 when the key is absent.
        let scores = match meta_array(meta, SCORES)? {
            None => vec![0.0; n],
            Some(a) if a.len() == n => (0..n)
                .map(|i| match a.f64(i) {
                    Some(x) if !x.is_nan() => Ok(x as f32 + 0.0),
                    _ => Err(TokenizerError::BadMetadata { key: SCORES, reason: format!("score {i} is not a number") }),
                })
                .collect::<Result<Vec<f32>>>()?,
            Some(a) => {
                return Err(TokenizerError::BadMetadata {
                    key: SCORES,
                    reason: format!("{} entries for {n} tokens", a.len()),
                })
            }
        };
        let ids = PieceIndex::new(tokens)?;
        let mut byte_ids = [None; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            let one = (b < 0x80).then(|| char::from(b as u8).to_string());
            *slot = ids.get(&format!("<0x{b:02X}>")).or_else(|| one.and_then(|c| ids.get(&c))).or(unk);
        }
        let add_space_prefix = meta.get("tokenizer.ggml.add_space_prefix").and_then(MetaValue::as_bool).unwrap_or(true);
        Ok(Spm { ids, scores, byte_ids, add_space_prefix })
    }

    fn encode(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let mut escaped = String::with_capacity(text.len() + text.len() / 2 + 3);
        if self.add_space_prefix {
            escaped.push(SPM_SPACE);
        }
        escaped.extend(text.chars().map(|c| if c == ' ' { SPM_SPACE } else { c }));
        if escaped.is_empty() {
            return Ok(());
        }
        if escaped.len() >= NONE as usize {
            return Err(TokenizerError::Backend("text fragment exceeds 4 GiB".into()));
        }

        let mut symbols: Vec<Symbol> = Vec::with_capacity(escaped.len());
        for (start, c) in escaped.char_indices() {
            let i = symbols.len() as u32;
            let end = start + c.len_utf8();
            symbols.push(Symbol {
                start: start as u32,
                len: c.len_utf8() as u32,
                prev: if i == 0 { NONE } else { i - 1 },
                next: if end == escaped.len() { NONE } else { i + 1 },
            });
        }
        let mut queue = BinaryHeap::with_capacity(symbols.len());
        let try_add = |queue: &mut BinaryHeap<Bigram>, symbols: &[Symbol], left: u32, right: u32| {
            if left == NONE || right == NONE {
                return;
            }
            let (l, r) = (symbols[left as usize], symbols[right as usize]);
            let len = l.len + r.len;
            let piece = &escaped[l.start as usize..(l.start + len) as usize];
            if let Some(id) = self.ids.get(piece) {
                queue.push(Bigram { score: self.scores[id as usize], left, right, len });
            }
        };
        for i in 1..symbols.len() as u32 {
            try_add(&mut queue, &symbols, i - 1, i);
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (symbols[b.left as usize], symbols[b.right as usize]);
            if l.len == 0 || r.len == 0 || l.len + r.len != b.len {
                continue;
            }
            symbols[b.left as usize].len = b.len;
            symbols[b.left as usize].next = r.next;
            symbols[b.right as usize].len = 0;
            if r.next != NONE {
                symbols[r.next as usize].prev = b.left;
            }
            try_add(&mut queue, &symbols, l.prev, b.left);
            try_add(&mut queue, &symbols, b.left, r.next);
        }

        let mut i = 0;
        while i != NONE {
            let s = symbols[i as usize];
            let piece = &escaped[s.start as usize..(s.start + s.len) as usize];
            match self.ids.get(piece) {
                Some(id) => out.push(id),
                None => {
                    for &byte in piece.as_bytes() {
                        out.push(self.byte_ids[byte as usize].ok_or_else(|| TokenizerError::BadMetadata {
                            key: "tokenizer.ggml.tokens",
                            reason: format!("no token for byte 0x{byte:02X} (no <0x{byte:02X}> and no unknown token)"),
                        })?);
                    }
                }
            }
            i = s.next;
        }
        Ok(())
    }
}

/// The bytes a SentencePiece token stands for: `▁` is a space, `<0xXX>` byte tokens are
/// their byte. User-defined pieces are written as plain text (Gemma's runs of spaces),
/// so only normal ones are unescaped, as in llama.cpp.
fn spm_piece(i: usize, token: &str, ty: TokenType, out: &mut Vec<u8>) -> Result<()> {
    match ty {
        TokenType::Control | TokenType::Unknown | TokenType::UserDefined => out.extend_from_slice(token.as_bytes()),
        TokenType::Unused => {}
        TokenType::Byte => {
            let byte = token
                .strip_prefix("<0x")
                .and_then(|h| h.strip_suffix('>'))
                .filter(|h| h.len() == 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| TokenizerError::BadMetadata {
                    key: "tokenizer.ggml.tokens",
                    reason: format!("byte token {i} is {:?}, not <0xXX>", one_line(token, 32)),
                })?;
            out.push(byte);
        }
        TokenType::Normal | TokenType::Undefined => {
            let mut parts = token.split(SPM_SPACE);
            out.extend_from_slice(parts.next().unwrap_or_default().as_bytes());
            for part in parts {
                out.push(b' ');
                out.extend_from_slice(part.as_bytes());
            }
        }
    }
    Ok(())
}

/// Special tokens (control, unknown and user-defined) found in text by leftmost-longest
/// matching, as `tokenizers` does and as llama.cpp does in every practical case. A byte
/// trie, because Gemma has 6,400 of them (most starting with `<`) and runs of spaces,
/// and every byte of the text is a possible start.
struct SpecialMatcher {
    nodes: Vec<TrieNode>,
}

#[derive(Default)]
struct TrieNode {
    /// (byte, child index), sorted by byte.
    children: Vec<(u8, u32)>,
    /// The first token with exactly this text, and the first user-defined one (matched
    /// even when `parse_special` is false).
    any: Option<u32>,
    always: Option<u32>,
}

impl SpecialMatcher {
    /// `tokens`: (text, id, matched even when `parse_special` is false), in id order.
    fn new(tokens: Vec<(&str, u32, bool)>) -> SpecialMatcher {
        let mut nodes = vec![TrieNode::default()];
        for (text, id, always) in tokens {
            if text.is_empty() {
                continue;
            }
            let mut at = 0usize;
            for &b in text.as_bytes() {
                at = match nodes[at].children.binary_search_by_key(&b, |c| c.0) {
                    Ok(k) => nodes[at].children[k].1 as usize,
                    Err(k) => {
                        let child = nodes.len();
                        nodes.push(TrieNode::default());
                        nodes[at].children.insert(k, (b, child as u32));
                        child
                    }
                };
            }
            let node = &mut nodes[at];
            node.any.get_or_insert(id);
            if always {
                node.always.get_or_insert(id);
            }
        }
        SpecialMatcher { nodes }
    }

    /// The special token starting at byte `pos`, if any: (length in bytes, id).
    fn match_at(&self, text: &[u8], pos: usize, parse_special: bool) -> Option<(usize, u32)> {
        let mut best = None;
        let mut at = 0usize;
        for (k, b) in text[pos..].iter().enumerate() {
            let children = &self.nodes[at].children;
            let Ok(c) = children.binary_search_by_key(b, |c| c.0) else {
                break;
            };
            at = children[c].1 as usize;
            let node = &self.nodes[at];
            if let Some(id) = if parse_special { node.any } else { node.always } {
                best = Some((k + 1, id));
            }
        }
        best
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
    unk: Option<u32>,
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

fn meta_array<'g>(meta: &'g dyn Metadata, key: &'static str) -> Result<Option<&'g MetaArray>> {
    match meta.get(key) {
        None => Ok(None),
        Some(v) => {
            v.as_array().map(Some).ok_or(TokenizerError::BadMetadata { key, reason: "expected an array".into() })
        }
    }
}

fn meta_strings<'g>(meta: &'g dyn Metadata, key: &'static str) -> Result<Option<Vec<&'g str>>> {
    let Some(arr) = meta_array(meta, key)? else {
        return Ok(None);
    };
    arr.strs()
        .map_err(|i| TokenizerError::BadMetadata { key, reason: format!("element {i} is not a string") })
        .map(Some)
}

/// A token id from metadata; ids outside the vocabulary (some converters write -1 or a
/// stale id) are treated as absent rather than failing the whole model.
fn meta_id(meta: &dyn Metadata, key: &str, n_vocab: usize) -> Option<u32> {
    let v = meta.get(key)?.as_u64()?;
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

fn build_bpe(meta: &dyn Metadata, tokens: &[&str], pre: &str) -> Result<Model> {
    let merges =
        meta_strings(meta, "tokenizer.ggml.merges")?.ok_or(TokenizerError::MissingKey("tokenizer.ggml.merges"))?;
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
            Model::Spm(_) => "SentencePiece",
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
    /// Build the tokenizer a model file's metadata describes (GGUF keys, in GGUF or `.cairn`).
    pub fn from_metadata(meta: &dyn Metadata) -> Result<Tokenizer> {
        let kind = meta.get_str("tokenizer.ggml.model").ok_or(TokenizerError::MissingKey("tokenizer.ggml.model"))?;
        let spm = match kind {
            "gpt2" => false,
            "llama" => true,
            other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
        };
        let tokens =
            meta_strings(meta, "tokenizer.ggml.tokens")?.ok_or(TokenizerError::MissingKey("tokenizer.ggml.tokens"))?;
        let n = tokens.len();
        if n == 0 || n >= u32::MAX as usize {
            return Err(TokenizerError::BadMetadata { key: "tokenizer.ggml.tokens", reason: format!("{n} tokens") });
        }
        let mut types = match meta_array(meta, "tokenizer.ggml.token_type")? {
            None => vec![TokenType::Normal; n],
            Some(a) if a.len() == n => (0..n).map(|i| TokenType::from_gguf(a.i64(i).unwrap_or(0))).collect(),
            Some(a) => {
                return Err(TokenizerError::BadMetadata {
                    key: "tokenizer.ggml.token_type",
                    reason: format!("{} entries for {n} tokens", a.len()),
                })
            }
        };

        // SentencePiece vocabularies have llama.cpp defaults for ids and BOS that a
        // converter may leave out: <unk> 0, <s> 1, </s> 2, BOS added.
        let id_or = |key: &str, spm_default: u32| match meta.get(key) {
            Some(_) => meta_id(meta, key, n),
            None => (spm && (spm_default as usize) < n).then_some(spm_default),
        };
        let bos = id_or("tokenizer.ggml.bos_token_id", 1);
        let eos = id_or("tokenizer.ggml.eos_token_id", 2);
        let unk = id_or("tokenizer.ggml.unknown_token_id", 0);
        let model = if spm {
            Model::Spm(Box::new(Spm::new(meta, &tokens, unk)?))
        } else {
            let pre = meta.get_str("tokenizer.ggml.pre").unwrap_or_else(|| {
                log::warn!("GGUF names no pre-tokenizer (tokenizer.ggml.pre); using llama.cpp's default");
                "default"
            });
            build_bpe(meta, &tokens, pre)?
        };

        let eom = meta_id(meta, "tokenizer.ggml.eom_token_id", n);
        let mut eot = meta_id(meta, "tokenizer.ggml.eot_token_id", n);
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
        for (i, (t, &ty)) in tokens.iter().zip(&types).enumerate() {
            if matches!(ty, TokenType::Control | TokenType::Unknown | TokenType::UserDefined) {
                specials.push((*t, i as u32, ty == TokenType::UserDefined));
            }
            if spm {
                spm_piece(i, t, ty, &mut pieces)?;
            } else {
                match ty {
                    TokenType::Control | TokenType::Unknown | TokenType::UserDefined => {
                        pieces.extend_from_slice(t.as_bytes())
                    }
                    TokenType::Unused => {}
                    _ => byte_level_decode(t, &mut pieces),
                }
            }
            piece_ends.push(u32::try_from(pieces.len()).map_err(|_| TokenizerError::BadMetadata {
                key: "tokenizer.ggml.tokens",
                reason: "vocabulary text exceeds 4 GiB".into(),
            })?);
        }

        let flag = |key: &str, default: bool| meta.get(key).and_then(MetaValue::as_bool).unwrap_or(default);
        Ok(Tokenizer {
            model,
            types,
            pieces,
            piece_ends,
            specials: SpecialMatcher::new(specials),
            bos,
            eos,
            eot,
            unk,
            eog,
            add_bos: flag("tokenizer.ggml.add_bos_token", spm) && bos.is_some(),
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

    /// The raw bytes a token stands for (byte-level decoded for BPE; `▁` as a space and
    /// `<0xXX>` as its byte for SentencePiece). A token may hold part of a UTF-8
    /// character; see [`StreamDecoder`] for joining them. Special tokens give their text,
    /// unused tokens nothing.
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

    /// The unknown token (`tokenizer.ggml.unknown_token_id`; `<unk>` is 0 by default in
    /// SentencePiece vocabularies). SentencePiece byte fallback uses it for a byte that
    /// has no `<0xXX>` token.
    pub fn unk_id(&self) -> Option<u32> {
        self.unk
    }

    /// Whether each run of plain text (at the start and after every special token) is
    /// encoded with a space in front (SentencePiece's `add_dummy_prefix`; false for
    /// Gemma 3 and for byte-level BPE). [`decode`](Self::decode) keeps that space; strip
    /// it if the original text is wanted back.
    pub fn add_space_prefix(&self) -> bool {
        matches!(&self.model, Model::Spm(s) if s.add_space_prefix)
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
/// UTF-8 characters: byte-level BPE and SentencePiece byte fallback often split an emoji
/// or a CJK character across tokens, and printing each half alone would show U+FFFD.
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
