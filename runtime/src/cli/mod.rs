//! Command-line interface: argument parsing here, one function per command.

mod commands;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::backend::BackendKind;
use crate::error::{Error, Result};
use crate::sampling::SamplingHints;

#[derive(Parser)]
#[command(name = "cairn", version, about = "Portable on-device LLM inference")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download a model (default: smollm2-135m-instruct) and print its path.
    Pull {
        name: Option<String>,
        /// Re-hash a model that is already present.
        #[arg(long)]
        verify: bool,
    },
    /// Chat with a model: interactive, or one answer with -p.
    Chat {
        #[command(flatten)]
        model: ModelArgs,
        /// Answer this one message and exit.
        #[arg(short, long)]
        prompt: Option<String>,
        /// System message.
        #[arg(long)]
        system: Option<String>,
        /// Most tokens per answer.
        #[arg(short = 'n', long, default_value_t = 512)]
        max_tokens: usize,
        #[command(flatten)]
        sampling: SamplingArgs,
        #[command(flatten)]
        long: LongArgs,
        #[command(flatten)]
        route: RouteArgs,
    },
    /// Raw completion of a prompt, without a chat template.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(short, long, required_unless_present = "prompt_file", conflicts_with = "prompt_file")]
        prompt: Option<String>,
        /// Read the prompt from a file.
        #[arg(long)]
        prompt_file: Option<PathBuf>,
        /// Keep only the first N tokens of the prompt (a documented truncation, for
        /// benchmarks at a given length); without it a prompt longer than the context is
        /// refused.
        #[arg(long, value_name = "N")]
        head_tokens: Option<usize>,
        #[arg(short = 'n', long, default_value_t = 128)]
        max_tokens: usize,
        #[command(flatten)]
        sampling: SamplingArgs,
        #[command(flatten)]
        long: LongArgs,
        /// Print one JSON object {"prompt_ids", "ids", "text"}.
        #[arg(long)]
        json: bool,
        /// Print time to first token and peak memory as one JSON line on stderr.
        #[arg(long)]
        stats: bool,
        #[command(flatten)]
        route: RouteArgs,
    },
    /// Print the token ids of a text (special tokens parsed).
    Tokenize {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        json: bool,
        text: String,
    },
    /// One batched pass over token ids; the top logits at every position.
    Eval {
        #[command(flatten)]
        model: ModelArgs,
        /// Comma-separated token ids.
        #[arg(long, value_delimiter = ',', required = true)]
        ids: Vec<u32>,
        #[arg(long, default_value_t = 5)]
        top: usize,
        #[arg(long)]
        json: bool,
        /// Evaluate only the tokens GemFilter keeps (rows labelled by their prompt index).
        #[arg(long, value_name = "k=N,layer=N|auto", num_args = 0..=1, default_missing_value = "")]
        gemfilter: Option<String>,
    },
    /// Needle in a haystack: accuracy per method over prompt lengths and needle depths.
    Needle {
        #[command(flatten)]
        model: ModelArgs,
        /// Prompt lengths in tokens (1k = 1024).
        #[arg(long, value_delimiter = ',', default_value = "1k,2k,4k,8k")]
        lengths: Vec<String>,
        /// Needle depths, 0 (start) to 1 (end of the haystack).
        #[arg(long, value_delimiter = ',', default_value = "0,0.25,0.5,0.75,1")]
        depths: Vec<f64>,
        /// Cases per (length, depth), each with its own key and value.
        #[arg(long, default_value_t = 1)]
        seeds: usize,
        /// Methods to compare (full, gemfilter, snapkv, h2o, recent, random).
        #[arg(long, value_delimiter = ',', default_value = "full,gemfilter,snapkv,h2o,recent,random")]
        method: Vec<String>,
        /// Token budget of every method but full.
        #[arg(short, long, default_value = "1024")]
        k: String,
        /// GemFilter's filter layer: a number or auto.
        #[arg(long, default_value = "auto")]
        layer: String,
        /// Haystack text (default: the Debian license texts in /usr/share/common-licenses).
        #[arg(long)]
        haystack: Option<PathBuf>,
        /// Write the full report (every case, answer, recall by layer) as JSON here.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Store the earliest layer that keeps the value in >= 90% of these cases as this
        /// model's `layer=auto`.
        #[arg(long)]
        save_auto: bool,
    },
    /// Perplexity of a text over fixed windows.
    Perplexity {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(short, long)]
        file: PathBuf,
        /// Evaluate at most this many windows (of -c/--ctx tokens, default 512).
        #[arg(long)]
        windows: Option<usize>,
    },
    /// Prompt-processing and generation speed, as llama-bench measures them.
    Bench {
        #[command(flatten)]
        model: ModelArgs,
        /// Prompt tokens (one batch); 0 skips the test.
        #[arg(short = 'p', long, default_value_t = 512)]
        prompt: usize,
        /// Generated tokens (one at a time); 0 skips the test.
        #[arg(short = 'n', long, default_value_t = 128)]
        gen: usize,
        /// Repetitions (after one warm-up).
        #[arg(short = 'r', long, default_value_t = 5)]
        reps: usize,
        /// Sequences decoded together in one batched pass per step (as `serve` runs its
        /// slots); tg reports their aggregate tokens/s.
        #[arg(long, default_value_t = 1)]
        parallel: usize,
        /// Output format.
        #[arg(short = 'o', long, default_value = "md", value_parser = ["md", "json"])]
        output: String,
    },
    /// Re-encode a model's linear weights into a .cairn file.
    Convert {
        /// Source model: a name (see `cairn pull`), a .gguf or a .cairn file.
        #[arg(short, long)]
        model: Option<String>,
        /// f16, fq8, fq4, fq8-auto, fq4-auto (FineQuant), rtn2, rtn3, rtn4 (round to nearest).
        #[arg(short, long)]
        quant: String,
        /// Group size for fq8, fq4 and rtn* (a multiple of 32; default 64).
        #[arg(short, long)]
        group: Option<usize>,
        /// Output .cairn file.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Decompose a model's linear weights into a BitStack .cairn (any-size model).
    Stack {
        /// Source model: a name (see `cairn pull`), a .gguf or a .cairn file.
        #[arg(short, long)]
        model: Option<String>,
        /// Output .cairn file.
        #[arg(short, long)]
        output: PathBuf,
        /// Residual blocks per matrix.
        #[arg(long, default_value_t = 16)]
        levels: usize,
        /// Rank of each block's factors (4: the lowest perplexity per bit up to about 6
        /// bits per parameter on SmolLM2, and the fastest decode).
        #[arg(long, default_value_t = 4)]
        rank: usize,
        /// Calibration text for activation-aware scaling (none: no scaling).
        #[arg(long)]
        calib: Option<PathBuf>,
        /// Calibration tokens (windows of 512).
        #[arg(long, default_value_t = 2048)]
        calib_tokens: usize,
        /// Most subspace iterations per block.
        #[arg(long, default_value_t = 12)]
        iters: usize,
        /// CPU threads (default: all cores).
        #[arg(short, long, default_value_t = 0)]
        threads: usize,
        /// Ordering proxy: res (effect on the residual stream), act (activation-weighted
        /// error), rel (error relative to the matrix's energy).
        #[arg(long, default_value = "res")]
        proxy: String,
    },
    /// Memory → perplexity (and tg) curve of a BitStack model.
    StackEval {
        #[command(flatten)]
        model: ModelArgs,
        /// Text for perplexity.
        #[arg(short, long)]
        file: PathBuf,
        /// Budgets from the smallest prefix to every block.
        #[arg(long, default_value_t = 8)]
        points: usize,
        /// Windows per point (0: speed only), of -c/--ctx tokens (default 512).
        #[arg(long, default_value_t = 4)]
        windows: usize,
        /// Generated tokens timed at each point (0: skip).
        #[arg(long, default_value_t = 128)]
        tg: usize,
        /// Also write the curve as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Check the ordering proxies: the ppl loss of removing the top block of this
        /// many matrices, each alone, from the prefix at --proxy-bits, rank-correlated
        /// with each proxy's value for that block.
        #[arg(long, default_value_t = 0)]
        proxy_check: usize,
        /// Top of the curve in bits per linear parameter (default: every block).
        #[arg(long)]
        max_bits: Option<f64>,
        /// Where the proxy check removes blocks from: the table's prefix at this many
        /// bits per linear parameter.
        #[arg(long, default_value_t = 4.0)]
        proxy_bits: f64,
        /// Block orders compared at equal bytes (comma list): table, res, act, rel, rr.
        #[arg(long, default_value = "table", value_delimiter = ',')]
        order: Vec<String>,
    },
    /// An OpenAI-compatible HTTP server: many callers at once, continuous batching.
    #[cfg(feature = "server")]
    Serve {
        #[command(flatten)]
        model: ModelArgs,
        /// Address to bind (loopback unless you say otherwise).
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Slots: sequences decoded together in one batch (-c is each slot's context).
        #[arg(long, default_value_t = 4)]
        parallel: usize,
        /// Requests that may wait for a slot; past it the server answers 503.
        #[arg(long, default_value_t = 16)]
        queue: usize,
        /// Require `Authorization: Bearer KEY` on everything but /health.
        #[arg(long, conflicts_with = "api_key_file")]
        api_key: Option<String>,
        /// Read the API key from this file (its first line).
        #[arg(long)]
        api_key_file: Option<PathBuf>,
        /// Server-side limit on one request, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// On SIGTERM, seconds running requests get to finish.
        #[arg(long, default_value_t = 30)]
        drain: u64,
        /// Serve a MoE² router over this registry (no -m): each request is routed within
        /// the budgets of its `cairn` object, else these.
        #[command(flatten)]
        route: RouteArgs,
    },
    /// MoE² routing: which experts may answer within the budgets.
    Route {
        #[command(subcommand)]
        command: RouteCommand,
    },
    /// Architecture, hyper-parameters, tensor types and sizes.
    Info {
        #[command(flatten)]
        model: ModelArgs,
        /// List the GPU adapters (features and limits) instead.
        #[arg(long)]
        devices: bool,
    },
}

#[derive(Subcommand)]
enum RouteCommand {
    /// Exact subset search over a JSON instance {experts: [{name, device, latency_s,
    /// energy_j}], loss: [2^N values by bitmask], latency_budget_s, energy_budget_j};
    /// prints {feasible, chosen, mask, loss, latency_s, energy_j} (infeasible: the
    /// cheapest expert alone).
    Solve { instance: PathBuf },
    /// Measure every expert of a registry (prefill and decode tokens/s, start cost,
    /// joules per token, round trip and transfer rate of remote ones) into
    /// REGISTRY.profile.json.
    Profile {
        registry: PathBuf,
        /// Timed repetitions per expert (the median is kept).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Watts of a remote server that reports no energy (an estimate, marked).
        #[arg(long, default_value_t = 15.0)]
        remote_watts: f64,
    },
    /// Score this machine's text (prose, code, other languages, structured data; some
    /// files held out) with every expert and train the gate: REGISTRY.gate.json, and the
    /// scored windows in REGISTRY.samples.json.
    Train {
        registry: PathBuf,
        /// Windows per category (training and held-out together).
        #[arg(long, default_value_t = 24)]
        windows: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Bits per byte on the held-out windows against latency and energy budgets for
    /// MoE², the best single expert, greedy selection and a random feasible set; and
    /// the measured budget violations of a request trace.
    Eval {
        registry: PathBuf,
        /// Budgets per curve.
        #[arg(long, default_value_t = 8)]
        points: usize,
        /// Routed requests in the violation trace (0: none).
        #[arg(long, default_value_t = 0)]
        trace: usize,
        /// Tokens each trace request generates.
        #[arg(long, default_value_t = 16)]
        trace_tokens: usize,
        /// Write every number as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write the curves as PREFIX-latency.svg and PREFIX-energy.svg.
        #[arg(long, value_name = "PREFIX")]
        plot: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

/// MoE² routing of `chat` and `generate`: the registry's experts answer instead of one
/// model, chosen per request within the budgets.
#[derive(Args)]
struct RouteArgs {
    /// An expert registry (TOML; its profile and gate beside it).
    #[arg(long, value_name = "REGISTRY")]
    route: Option<PathBuf>,
    /// Latency budget per answer (`2s`, `500ms`).
    #[arg(long, requires = "route", default_value = "10s")]
    latency_budget: String,
    /// Energy budget per answer (`3J`, `500mJ`).
    #[arg(long, requires = "route", default_value = "100J")]
    energy_budget: String,
    /// When nothing fits: `cheapest` (the cheapest expert answers, said so) or `refuse`.
    #[arg(long, requires = "route", default_value = "cheapest")]
    fallback: crate::route::router::Fallback,
    /// Print the routing report as one JSON line on stderr (else a short summary).
    #[arg(long, requires = "route")]
    route_json: bool,
}

impl RouteArgs {
    fn routed(&self) -> Result<Option<commands::Routed>> {
        let Some(registry) = &self.route else { return Ok(None) };
        let budget = crate::route::router::Budget {
            latency_s: crate::route::router::parse_seconds(&self.latency_budget)?,
            energy_j: crate::route::router::parse_joules(&self.energy_budget)?,
        };
        budget.check()?;
        Ok(Some(commands::Routed {
            registry: registry.clone(),
            budget,
            fallback: self.fallback,
            json: self.route_json,
        }))
    }
}

#[derive(Args)]
struct ModelArgs {
    /// Model name (see `cairn pull`) or path to a .gguf or .cairn file.
    #[arg(short, long)]
    model: Option<String>,
    /// CPU threads (default: all cores).
    #[arg(short, long, default_value_t = 0)]
    threads: usize,
    /// Context length: the tokens a cache holds and a memory budget reserves (default:
    /// the model's; perplexity and stack-eval: their window, 512).
    #[arg(short, long, visible_alias = "ctx", default_value_t = 0)]
    ctx_size: usize,
    /// f32 activations and dequantized weights (the reference path) instead of the
    /// 8-bit integer kernels.
    #[arg(long)]
    exact: bool,
    /// Backend: cpu, cuda (the first NVIDIA device), wgpu (the first GPU adapter; see
    /// `cairn info --devices`), or auto (cuda, else wgpu on a real GPU, else cpu).
    #[arg(long, default_value = "cpu")]
    backend: BackendKind,
    /// Memory budget (e.g. 90MB, 1.5GiB): a BitStack model keeps the longest prefix of
    /// its stack that fits beside the dense tensors, KV cache and scratch.
    #[arg(long)]
    memory: Option<String>,
    /// BitStack matrices whose blocks would outweigh a dense Q8_0 copy run from one
    /// (auto), or always from their blocks (off).
    #[arg(long, default_value = "auto")]
    dense_cache: String,
}

/// Long prompts on a budget: GemFilter, or a baseline at the same budget.
#[derive(Args)]
struct LongArgs {
    /// GemFilter: run layers 0..=r over the prompt, keep the k tokens layer r's last query
    /// attends to most, run the whole model on those only (default k=1024, layer=auto).
    #[arg(long, value_name = "k=N,layer=N|auto", num_args = 0..=1, default_missing_value = "")]
    gemfilter: Option<String>,
    /// A baseline at the same kind of budget: snapkv, h2o, recent or random, with ",k=N".
    #[arg(long, value_name = "METHOD[,k=N]", conflicts_with = "gemfilter")]
    baseline: Option<String>,
    /// Print (on stderr) the prompt text the method kept: GemFilter's explanation.
    #[arg(long)]
    show_selected: bool,
}

impl LongArgs {
    fn method(&self, seed: u64) -> Result<crate::longctx::Method> {
        use crate::longctx::{parse_count, FilterLayer, Method, DEFAULT_K};
        if let Some(spec) = &self.gemfilter {
            return Method::parse_gemfilter(spec);
        }
        let Some(spec) = &self.baseline else { return Ok(Method::Full) };
        let mut parts = spec.split(',').map(str::trim);
        let name = parts.next().unwrap_or("");
        let mut k = DEFAULT_K;
        for p in parts {
            k = match p.strip_prefix("k=").and_then(parse_count) {
                Some(k) => k,
                None => return Err(Error::input(format!("--baseline: {p:?} is not understood (expected k=N)"))),
            };
        }
        if name == "full" || name == "gemfilter" {
            return Err(Error::input(format!("--baseline {name}: use --gemfilter, or no flag for full attention")));
        }
        Method::by_name(name, k, FilterLayer::Auto, seed)
    }
}

/// Sampling flags; one left out takes the model's default (its metadata, else its
/// registry entry, else built in: `cairn info` shows which).
#[derive(Args)]
struct SamplingArgs {
    /// Temperature; 0 is greedy (default: the model's, else 0.8).
    #[arg(long)]
    temp: Option<f32>,
    /// Keep the k most likely tokens; 0 keeps all (default: the model's, else 40).
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling; 1 keeps all (default: the model's, else 0.95).
    #[arg(long)]
    top_p: Option<f32>,
    /// Drop tokens below this fraction of the best one's probability (default: the
    /// model's, else 0.05).
    #[arg(long)]
    min_p: Option<f32>,
    /// Penalty on tokens seen in the last 64; 1 disables (default: the model's, else 1).
    #[arg(long)]
    repeat_penalty: Option<f32>,
    #[arg(long)]
    presence_penalty: Option<f32>,
    /// Random seed (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
}

impl SamplingArgs {
    /// The flags given, checked, and the seed.
    fn hints(&self) -> Result<(SamplingHints, u64)> {
        let bad = |m: &str| Err(Error::input(m.to_string()));
        if self.temp.is_some_and(|t| !t.is_finite() || t < 0.0) {
            return bad("--temp must be a number ≥ 0");
        }
        let unit = |v: Option<f32>| v.is_none_or(|p| (0.0..=1.0).contains(&p));
        if !unit(self.top_p) || !unit(self.min_p) {
            return bad("--top-p and --min-p must be between 0 and 1");
        }
        if self.repeat_penalty.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
            return bad("--repeat-penalty must be > 0");
        }
        if self.presence_penalty.is_some_and(|p| !p.is_finite()) {
            return bad("--presence-penalty must be a number");
        }
        let hints = SamplingHints {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: None,
            presence_penalty: self.presence_penalty,
        };
        Ok((hints, self.seed.unwrap_or_else(crate::sampling::seed_from_time)))
    }
}

pub fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Pull { name, verify } => commands::pull(name.as_deref(), verify),
        Command::Chat { model, prompt, system, max_tokens, sampling, long, route } => {
            let (flags, seed) = sampling.hints()?;
            if let Some(r) = route.routed()? {
                return commands::route_chat(&r, prompt.as_deref(), system.as_deref(), max_tokens, &flags, seed);
            }
            let method = long.method(seed)?;
            let turn = commands::Turn { max_new: max_tokens, flags, seed, method, show_selected: long.show_selected };
            commands::chat(&model, prompt.as_deref(), system.as_deref(), turn)
        }
        Command::Generate {
            model,
            prompt,
            prompt_file,
            head_tokens,
            max_tokens,
            sampling,
            long,
            json,
            stats,
            route,
        } => {
            let prompt = match (prompt, prompt_file) {
                (Some(p), _) => p,
                (None, Some(f)) => {
                    let bytes = std::fs::read(&f).map_err(|source| Error::Io { path: f.clone(), source })?;
                    String::from_utf8_lossy(&bytes).into_owned()
                }
                (None, None) => return Err(Error::input("give --prompt or --prompt-file")),
            };
            let (flags, seed) = sampling.hints()?;
            if let Some(r) = route.routed()? {
                return commands::route_generate(&r, &prompt, max_tokens, &flags, seed, json);
            }
            let method = long.method(seed)?;
            let turn = commands::Turn { max_new: max_tokens, flags, seed, method, show_selected: long.show_selected };
            commands::generate(&model, &prompt, head_tokens, turn, json, stats)
        }
        Command::Tokenize { model, json, text } => commands::tokenize(&model, &text, json),
        Command::Eval { model, ids, top, json, gemfilter } => {
            let method = gemfilter.as_deref().map(crate::longctx::Method::parse_gemfilter).transpose()?;
            commands::eval(&model, &ids, top, json, method)
        }
        Command::Needle { model, lengths, depths, seeds, method, k, layer, haystack, output, save_auto } => {
            let lengths = lengths
                .iter()
                .map(|l| {
                    crate::longctx::parse_count(l)
                        .filter(|&n| n > 0)
                        .ok_or_else(|| Error::input(format!("--lengths: {l:?} is not a token count")))
                })
                .collect::<Result<Vec<_>>>()?;
            if let Some(d) = depths.iter().find(|d| !(0.0..=1.0).contains(*d)) {
                return Err(Error::input(format!("--depths: {d} is not between 0 and 1")));
            }
            let k = crate::longctx::parse_count(&k)
                .filter(|&k| k > 0)
                .ok_or_else(|| Error::input(format!("-k {k:?}: the budget must be at least 1 token")))?;
            let layer = match layer.as_str() {
                "auto" => crate::longctx::FilterLayer::Auto,
                n => crate::longctx::FilterLayer::Fixed(
                    n.parse().map_err(|_| Error::input(format!("--layer {n:?} is not a number or auto")))?,
                ),
            };
            if seeds == 0 {
                return Err(Error::input("--seeds must be at least 1"));
            }
            let opts = crate::needle::NeedleOptions { lengths, depths, seeds, methods: method, k, layer, max_new: 12 };
            commands::needle(&model, &opts, haystack.as_deref(), output.as_deref(), save_auto)
        }
        Command::Perplexity { model, file, windows } => commands::perplexity(&model, &file, windows),
        Command::Bench { model, prompt, gen, reps, parallel, output } => {
            commands::bench(&model, prompt, gen, reps, parallel, &output)
        }
        #[cfg(feature = "server")]
        Command::Serve { model, host, port, parallel, queue, api_key, api_key_file, timeout, drain, route } => {
            let api_key = match (api_key, api_key_file) {
                (Some(k), _) => Some(k),
                (None, Some(f)) => {
                    let s = std::fs::read_to_string(&f).map_err(|source| Error::Io { path: f.clone(), source })?;
                    let k = s.lines().next().unwrap_or("").trim().to_string();
                    if k.is_empty() {
                        return Err(Error::input(format!("{}: the API key file is empty", f.display())));
                    }
                    Some(k)
                }
                (None, None) => None,
            };
            if api_key.as_deref().is_some_and(str::is_empty) {
                return Err(Error::input("--api-key must not be empty"));
            }
            let route = route.routed()?;
            if route.is_some() && model.model.is_some() {
                return Err(Error::input("serve takes -m MODEL or --route REGISTRY, not both"));
            }
            let opts = commands::ServeArgs { host, port, parallel, queue, api_key, timeout, drain, route };
            commands::serve(&model, opts)
        }
        Command::Route { command: RouteCommand::Solve { instance } } => commands::route_solve(&instance),
        Command::Route { command: RouteCommand::Profile { registry, reps, remote_watts } } => {
            commands::route_profile(&registry, reps, remote_watts)
        }
        Command::Route { command: RouteCommand::Train { registry, windows, seed } } => {
            commands::route_train(&registry, windows, seed)
        }
        Command::Route { command: RouteCommand::Eval { registry, points, trace, trace_tokens, json, plot, seed } } => {
            let o = commands::EvalOptions { points, trace, trace_tokens, json, plot, seed };
            commands::route_eval(&registry, &o)
        }
        Command::Info { devices: true, .. } => commands::devices(),
        Command::Info { model, .. } => commands::info(&model),
        Command::Stack { model, output, levels, rank, calib, calib_tokens, iters, threads, proxy } => {
            if levels == 0 || rank == 0 {
                return Err(Error::input("--levels and --rank must be at least 1"));
            }
            let input = commands::resolve_model(model.as_deref())?;
            let mut opts = crate::bitstack::build::StackOptions {
                levels,
                rank,
                calib,
                calib_tokens,
                threads,
                proxy: crate::bitstack::build::Proxy::parse(&proxy)?,
                ..Default::default()
            };
            opts.iters.max_iters = iters.max(1);
            crate::bitstack::build::run(&input, &output, &opts)
        }
        Command::StackEval { model, file, points, windows, tg, json, proxy_check, max_bits, proxy_bits, order } => {
            let opts = commands::StackEvalOptions {
                points,
                window: commands::window(&model),
                windows,
                tg,
                proxy_check,
                proxy_bits,
                max_bits,
                orders: order,
            };
            commands::stack_eval(&model, &file, &opts, json.as_deref())
        }
        Command::Convert { model, quant, group, output } => {
            let quant = crate::convert::Quant::parse(&quant, group)?;
            let input = commands::resolve_model(model.as_deref())?;
            crate::convert::run(&input, quant, &output)
        }
    }
}
