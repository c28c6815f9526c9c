//! `cairn route train`: score this machine's text windows with every expert of a
//! registry (local ones in-process, remote ones through `echo` on their server), train
//! the gate on the training windows and keep the scored windows, held-out ones
//! included, in `REGISTRY.samples.json` for `cairn route eval`.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::corpus::{Category, Corpus};
use super::gate::{self, Gate, Sample, TrainOptions};
use super::registry::{Place, Registry};
use super::remote::Remote;
use crate::engine::Engine;
use crate::error::{Error, Result};

/// Every expert of a registry, ready to score text.
pub struct Scorers {
    pub names: Vec<String>,
    /// Local engines by expert (remote: `None`).
    pub engines: Vec<Option<Engine>>,
    pub remotes: Vec<Option<Remote>>,
    /// The local expert whose tokenizer each expert uses.
    pub tokenizer_of: Vec<usize>,
    /// Tokenizer family per expert (the gate's groups).
    pub groups: Vec<usize>,
    pub embedder: usize,
}

impl Scorers {
    pub fn open(reg: &Registry) -> Result<Scorers> {
        let n = reg.experts.len();
        let (mut engines, mut remotes, mut tokenizer_of) = (Vec::new(), Vec::new(), Vec::new());
        for (i, e) in reg.experts.iter().enumerate() {
            match &e.place {
                Place::Local { .. } => {
                    eprintln!("loading {} ...", e.name);
                    // Experts are scored one after another: each may use every core.
                    engines.push(Some(super::load_local_threads(e, Some(0))?));
                    remotes.push(None);
                    tokenizer_of.push(i);
                }
                Place::Remote { url, model, api_key, tokenizer } => {
                    let t = tokenizer.as_deref().and_then(|t| reg.find(t)).ok_or_else(|| {
                        Error::input(format!(
                            "{}: a remote expert needs `tokenizer = \"<local expert>\"` to be scored and trained on",
                            e.name
                        ))
                    })?;
                    engines.push(None);
                    remotes.push(Some(Remote::new(url, model.as_deref(), api_key.as_deref())));
                    tokenizer_of.push(t);
                }
            }
        }
        let refs: Vec<Option<&Engine>> = engines.iter().map(Option::as_ref).collect();
        let tok: Vec<Option<usize>> = tokenizer_of.iter().map(|&t| Some(t)).collect();
        let groups = super::router::families(&refs, &tok)?;
        debug_assert_eq!(groups.len(), n);
        Ok(Scorers { names: reg.names(), engines, remotes, tokenizer_of, groups, embedder: reg.embedder })
    }

    fn engine(&self, i: usize) -> Result<&Engine> {
        self.engines[i].as_ref().ok_or_else(|| Error::model(format!("{} is not local", self.names[i])))
    }

    /// One window as every expert saw it.
    pub fn sample(&self, category: Category, held_out: bool, text: &str) -> Result<Sample> {
        let mut embedding = Vec::new();
        let mut logprobs = Vec::with_capacity(self.names.len());
        for i in 0..self.names.len() {
            let tok = self.engine(self.tokenizer_of[i])?;
            let ids = gate::window_ids(tok, text)?;
            logprobs.push(match (&self.engines[i], &self.remotes[i]) {
                // The embedder scores and embeds in one pass.
                (Some(e), _) if i == self.embedder && ids.len() >= 2 => {
                    let (lp, emb) = e.score_and_embed(&ids)?;
                    embedding = emb;
                    lp
                }
                (Some(e), _) => e.score(&ids)?,
                (None, Some(r)) => r
                    .score(&ids, Duration::from_secs(300))
                    .map_err(|e| Error::input(format!("{}: {e}", self.names[i])))?,
                (None, None) => return Err(Error::model("an expert is neither local nor remote")),
            });
        }
        if embedding.is_empty() {
            let e = self.engine(self.embedder)?;
            embedding = e.embed(&gate::window_ids(e, text)?)?;
        }
        Ok(Sample { category, held_out, embedding, logprobs, bytes: text.len() })
    }
}

/// The scored windows as saved beside the registry.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleFile {
    pub experts: Vec<String>,
    pub groups: Vec<usize>,
    pub windows: Vec<SavedSample>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedSample {
    pub category: String,
    pub held_out: bool,
    pub bytes: usize,
    /// The window's first bytes (to route a request like it in the eval trace).
    pub head: String,
    pub embedding: Vec<f32>,
    pub logprobs: Vec<Vec<f32>>,
}

impl SampleFile {
    pub fn load(path: &Path, experts: &[String]) -> Result<SampleFile> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        let f: SampleFile = serde_json::from_str(&text)
            .map_err(|e| Error::input(format!("{}: not a samples file: {e}", path.display())))?;
        if f.experts != experts {
            return Err(Error::input(format!(
                "{}: scored by {:?}, the registry has {experts:?}: run `cairn route train` again",
                path.display(),
                f.experts
            )));
        }
        if f.windows.iter().any(|w| w.logprobs.len() != experts.len()) {
            return Err(Error::input(format!("{}: a window lacks some expert's scores", path.display())));
        }
        Ok(f)
    }

    pub fn samples(&self) -> Result<Vec<Sample>> {
        self.windows
            .iter()
            .map(|w| {
                Ok(Sample {
                    category: Category::parse(&w.category)?,
                    held_out: w.held_out,
                    embedding: w.embedding.clone(),
                    logprobs: w.logprobs.clone(),
                    bytes: w.bytes,
                })
            })
            .collect()
    }
}

/// Cut a string at a char boundary at most `n` bytes in.
pub fn head(text: &str, n: usize) -> &str {
    let mut end = n.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Score the corpus, train the gate, save both beside the registry; returns the gate.
pub fn train(reg: &Registry, windows: usize, seed: u64, opts: &TrainOptions) -> Result<Gate> {
    let corpus = Corpus::gather(windows, seed)?;
    for c in &corpus.missing {
        eprintln!("note: no {c} text found on this machine; the gate trains without it");
    }
    let scorers = Scorers::open(reg)?;
    let total = corpus.windows.len();
    let (mut samples, mut saved) = (Vec::with_capacity(total), Vec::with_capacity(total));
    for (k, w) in corpus.windows.iter().enumerate() {
        let s = scorers.sample(w.category, w.held_out, &w.text)?;
        saved.push(SavedSample {
            category: w.category.name().to_string(),
            held_out: w.held_out,
            bytes: s.bytes,
            head: head(&w.text, 400).to_string(),
            embedding: s.embedding.clone(),
            logprobs: s.logprobs.clone(),
        });
        samples.push(s);
        eprint!(
            "\rscored {}/{total} windows ({}, {})   ",
            k + 1,
            w.category,
            if w.held_out { "held out" } else { "train" }
        );
    }
    eprintln!();
    let file = SampleFile { experts: scorers.names.clone(), groups: scorers.groups.clone(), windows: saved };
    let path = reg.side_file("samples");
    let text = serde_json::to_string(&file).map_err(|e| Error::model(format!("cannot write the samples: {e}")))?;
    std::fs::write(&path, text).map_err(|source| Error::Io { path: path.clone(), source })?;
    let mut g = gate::train(&samples, &scorers.groups, opts)?;
    let names: Vec<&str> = scorers.names.iter().map(String::as_str).collect();
    g.set_experts(&names)?;
    g.save(&reg.side_file("gate"))?;
    Ok(g)
}
