//! The expert registry: a TOML file naming every model a router may call, where it runs,
//! and how. Its profile (`REGISTRY.profile.json`) and gate (`REGISTRY.gate.json`) live
//! beside it, so one path names the whole router.
//!
//! ```toml
//! [[expert]]
//! name = "smollm2"
//! model = "smollm2"            # a `cairn pull` name or a .gguf / .cairn path
//! device = "phone"             # experts on one device run one after another
//! threads = 2
//!
//! [[expert]]
//! name = "smollm2-3bit"
//! model = "smollm2.cairn"      # relative paths start at the registry's directory
//! memory = "60MB"              # a BitStack model's size (any model: a budget)
//! context = 1024               # KV cache tokens the budget reserves (default 4096)
//! device = "phone"
//!
//! [[expert]]
//! name = "edge"
//! url = "http://10.0.0.2:8080" # any OpenAI-compatible server
//! remote_model = "qwen2.5-7b"  # the request's `model` (default: none, the server's own)
//! api_key_env = "EDGE_KEY"     # or api_key = "..."
//! device = "edge-box"
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::MAX_EXPERTS;

/// A local expert's KV cache in tokens, unless the registry says: routed requests are
/// short, and a memory budget reserves the whole cache.
pub const DEFAULT_CONTEXT: usize = 4096;
use crate::backend::BackendKind;
use crate::error::{Error, Result};

/// Where an expert runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Place {
    /// In this process.
    Local {
        /// A registry name (`cairn pull`) or an absolute path.
        model: String,
        backend: BackendKind,
        /// CPU threads (0: all).
        threads: usize,
        /// Memory budget in bytes (a BitStack model loads this much of its stack).
        memory: Option<u64>,
        /// Tokens of KV cache a session may hold (and the budget reserves).
        context: usize,
    },
    /// Behind an OpenAI-compatible HTTP API.
    Remote {
        /// Base URL, without a trailing `/` (requests go to `{url}/v1/...`).
        url: String,
        /// The `model` field of its requests (none: the server's only model; vLLM needs
        /// one).
        model: Option<String>,
        api_key: Option<String>,
        /// The local expert whose tokenizer the server's model shares: the router then
        /// mixes it token by token with that expert's family (else it answers by text).
        tokenizer: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ExpertSpec {
    pub name: String,
    pub device: String,
    pub place: Place,
}

impl ExpertSpec {
    pub fn is_local(&self) -> bool {
        matches!(self.place, Place::Local { .. })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Registry {
    /// The registry file; its profile and gate are named after it.
    pub path: PathBuf,
    pub experts: Vec<ExpertSpec>,
    /// The local expert whose hidden states embed prompts for the gate.
    pub embedder: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// The local expert that embeds prompts (default: the first local one).
    embedder: Option<String>,
    #[serde(default)]
    expert: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    device: String,
    model: Option<String>,
    backend: Option<String>,
    threads: Option<usize>,
    memory: Option<String>,
    context: Option<usize>,
    url: Option<String>,
    remote_model: Option<String>,
    api_key: Option<String>,
    api_key_env: Option<String>,
    tokenizer: Option<String>,
}

impl Registry {
    pub fn load(path: &Path) -> Result<Registry> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        Registry::parse(&text, path).map_err(|e| Error::input(format!("{}: {e}", path.display())))
    }

    /// Parse registry text; `path` places relative model paths and the side files.
    pub fn parse(text: &str, path: &Path) -> Result<Registry> {
        let file: File = toml::from_str(text).map_err(|e| Error::input(format!("not a registry: {}", e.message())))?;
        if file.expert.is_empty() {
            return Err(Error::input("no [[expert]] entries"));
        }
        if file.expert.len() > MAX_EXPERTS {
            return Err(Error::input(format!("{} experts: at most {MAX_EXPERTS}", file.expert.len())));
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut experts: Vec<ExpertSpec> = Vec::with_capacity(file.expert.len());
        for (i, e) in file.expert.into_iter().enumerate() {
            let spec = entry(e, dir).map_err(|err| Error::input(format!("expert {}: {err}", i + 1)))?;
            if experts.iter().any(|x| x.name == spec.name) {
                return Err(Error::input(format!("expert {}: the name {:?} is used twice", i + 1, spec.name)));
            }
            experts.push(spec);
        }
        for e in &experts {
            if let Place::Remote { tokenizer: Some(t), .. } = &e.place {
                if !experts.iter().any(|x| &x.name == t && x.is_local()) {
                    return Err(Error::input(format!("{}: tokenizer {t:?} is not a local expert's name", e.name)));
                }
            }
        }
        let embedder = match file.embedder {
            Some(name) => {
                let i = experts
                    .iter()
                    .position(|e| e.name == name)
                    .ok_or_else(|| Error::input(format!("embedder {name:?} is not an expert's name")))?;
                if !experts[i].is_local() {
                    return Err(Error::input(format!("embedder {name:?} is remote: the gate embeds prompts locally")));
                }
                i
            }
            None => experts
                .iter()
                .position(ExpertSpec::is_local)
                .ok_or_else(|| Error::input("every expert is remote: the gate needs a local model to embed prompts"))?,
        };
        Ok(Registry { path: path.to_path_buf(), experts, embedder })
    }

    /// `REGISTRY.<what>.json` beside the registry (`what`: `profile`, `gate`).
    pub fn side_file(&self, what: &str) -> PathBuf {
        let stem = self.path.file_stem().and_then(|s| s.to_str()).unwrap_or("registry");
        self.path.with_file_name(format!("{stem}.{what}.json"))
    }

    pub fn names(&self) -> Vec<String> {
        self.experts.iter().map(|e| e.name.clone()).collect()
    }

    pub fn find(&self, name: &str) -> Option<usize> {
        self.experts.iter().position(|e| e.name == name)
    }
}

fn entry(e: Entry, dir: &Path) -> Result<ExpertSpec> {
    let name = e.name.trim().to_string();
    if name.is_empty() || name.chars().any(|c| c.is_control() || c == ',') {
        return Err(Error::input(format!("name {:?} must be non-empty, without commas", e.name)));
    }
    let at = |m: String| Error::input(format!("{name}: {m}"));
    if e.device.trim().is_empty() {
        return Err(at("device must not be empty".into()));
    }
    let place = match (e.model, e.url) {
        (Some(_), Some(_)) => return Err(at("give either model (local) or url (remote), not both".into())),
        (None, None) => return Err(at("needs model (a local file or registry name) or url (a server)".into())),
        (Some(model), None) => {
            for (field, set) in [
                ("remote_model", e.remote_model.is_some()),
                ("api_key", e.api_key.is_some()),
                ("tokenizer", e.tokenizer.is_some()),
            ] {
                if set {
                    return Err(at(format!("{field} is for remote experts (with url)")));
                }
            }
            let backend = match e.backend.as_deref() {
                None => BackendKind::Cpu,
                Some(b) => b.parse().map_err(at)?,
            };
            let memory =
                e.memory.as_deref().map(crate::bitstack::parse_size).transpose().map_err(|x| at(x.to_string()))?;
            if memory == Some(0) {
                return Err(at("memory must be more than 0".into()));
            }
            // A path (it names a file) goes relative to the registry; a bare name stays.
            let looks_like_path = model.contains('/') || model.ends_with(".gguf") || model.ends_with(".cairn");
            let model = if looks_like_path && Path::new(&model).is_relative() {
                dir.join(&model).to_string_lossy().into_owned()
            } else {
                model
            };
            let context = e.context.unwrap_or(DEFAULT_CONTEXT);
            if !(64..=1 << 20).contains(&context) {
                return Err(at(format!("context {context} is not a number of tokens from 64 to 1048576")));
            }
            Place::Local { model, backend, threads: e.threads.unwrap_or(0), memory, context }
        }
        (None, Some(url)) => {
            for (field, set) in [
                ("backend", e.backend.is_some()),
                ("threads", e.threads.is_some()),
                ("memory", e.memory.is_some()),
                ("context", e.context.is_some()),
            ] {
                if set {
                    return Err(at(format!("{field} is for local experts: a remote one is configured on its server")));
                }
            }
            let url = url.trim().trim_end_matches('/').to_string();
            let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
            if rest.is_none_or(|r| r.is_empty() || r.contains(char::is_whitespace)) {
                return Err(at(format!("url {url:?} must start with http:// or https:// and name a host")));
            }
            let api_key = match (e.api_key, e.api_key_env) {
                (Some(_), Some(_)) => return Err(at("give api_key or api_key_env, not both".into())),
                (Some(k), None) => Some(k),
                (None, Some(var)) => {
                    Some(std::env::var(&var).map_err(|_| at(format!("api_key_env: the variable {var} is not set")))?)
                }
                (None, None) => None,
            };
            Place::Remote { url, model: e.remote_model, api_key, tokenizer: e.tokenizer }
        }
    };
    Ok(ExpertSpec { name, device: e.device.trim().to_string(), place })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Registry> {
        Registry::parse(text, Path::new("/srv/router/edge.toml"))
    }

    #[test]
    fn local_and_remote() {
        let r = parse(
            r#"
            embedder = "tiny"
            [[expert]]
            name = "big"
            model = "gemma3-270m"
            device = "phone"
            [[expert]]
            name = "tiny"
            model = "models/smol.cairn"
            memory = "60MB"
            threads = 2
            context = 1024
            device = "phone"
            [[expert]]
            name = "edge"
            url = "http://10.0.0.2:8080/"
            api_key = "k"
            tokenizer = "tiny"
            device = "box"
            "#,
        )
        .unwrap();
        assert_eq!(r.embedder, 1);
        assert_eq!(
            r.experts[0].place,
            Place::Local {
                model: "gemma3-270m".into(),
                backend: BackendKind::Cpu,
                threads: 0,
                memory: None,
                context: DEFAULT_CONTEXT
            }
        );
        assert_eq!(
            r.experts[1].place,
            Place::Local {
                model: "/srv/router/models/smol.cairn".into(),
                backend: BackendKind::Cpu,
                threads: 2,
                memory: Some(60_000_000),
                context: 1024
            }
        );
        assert_eq!(
            r.experts[2].place,
            Place::Remote {
                url: "http://10.0.0.2:8080".into(),
                model: None,
                api_key: Some("k".into()),
                tokenizer: Some("tiny".into())
            }
        );
        assert_eq!(r.side_file("gate"), PathBuf::from("/srv/router/edge.gate.json"));
    }

    #[test]
    fn bad_registries_say_why() {
        let cases = [
            ("", "no [[expert]]"),
            ("[[expert]]\nname = \"a\"\ndevice = \"d\"", "needs model"),
            ("[[expert]]\nname = \"a\"\ndevice = \"d\"\nmodel = \"m\"\nurl = \"http://x\"", "not both"),
            ("[[expert]]\nname = \"a\"\ndevice = \"d\"\nurl = \"ftp://x\"", "must start with http"),
            ("[[expert]]\nname = \"a\"\ndevice = \"d\"\nurl = \"http://x\"\nthreads = 2", "for local experts"),
            ("[[expert]]\nname = \"a\"\ndevice = \"d\"\nmodel = \"m\"\nmemory = \"lots\"", "memory size"),
            ("[[expert]]\nname = \"a\"\ndevice = \"d\"\nmodel = \"m\"\nbackend = \"tpu\"", "unknown backend"),
            ("[[expert]]\nname = \"a\"\ndevice = \"d\"\nmodel = \"m\"\ncontext = 8", "from 64"),
            ("[[expert]]\nname = \"a\"\ndevice = \"d\"\nurl = \"http://x\"\ncontext = 512", "for local experts"),
            ("[[expert]]\nname = \"a\"\ndevice = \"d\"\nmodel = \"m\"\ncolour = 1", "unknown field"),
            ("[[expert]]\nname = \"a\"\ndevice = \"d\"\nurl = \"http://x\"", "every expert is remote"),
            (
                "[[expert]]\nname = \"a\"\ndevice = \"d\"\nmodel = \"m\"\n[[expert]]\nname = \"a\"\ndevice = \"d\"\nmodel = \"n\"",
                "used twice",
            ),
            (
                "[[expert]]\nname = \"a\"\ndevice = \"d\"\nmodel = \"m\"\n[[expert]]\nname = \"b\"\ndevice = \"d\"\nurl = \"http://x\"\ntokenizer = \"c\"",
                "not a local expert",
            ),
            ("embedder = \"zz\"\n[[expert]]\nname = \"a\"\ndevice = \"d\"\nmodel = \"m\"", "not an expert"),
            ("[[expert]\nname = 1", "not a registry"),
        ];
        for (text, want) in cases {
            let e = parse(text).expect_err(text).to_string();
            assert!(e.contains(want), "{text:?}: {e:?} lacks {want:?}");
        }
        let many: String = (0..=MAX_EXPERTS)
            .map(|i| format!("[[expert]]\nname = \"e{i}\"\ndevice = \"d\"\nmodel = \"m\"\n"))
            .collect();
        assert!(parse(&many).unwrap_err().to_string().contains("at most"));
    }
}
