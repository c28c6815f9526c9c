/* C tests of the Cairn ABI: the happy path against llama.cpp's reference outputs for
 * SmolLM2-135M-Instruct Q4_1, and every misuse we can provoke from C.
 * Usage: test_cairn MODEL.gguf NOT_A_MODEL_FILE
 * Built by ffi/tests/c_api.rs with gcc -Wall -Wextra -Werror against both the shared
 * and the static library, and run under valgrind or AddressSanitizer there. */
#define _POSIX_C_SOURCE 200809L
#include "cairn.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int failures = 0;

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "%s:%d: CHECK failed: %s (last error: %s)\n", __FILE__,  \
                    __LINE__, #cond, cairn_last_error());                            \
            failures++;                                                              \
        }                                                                            \
    } while (0)

#define CHECK_STATUS(call, want)                                                     \
    do {                                                                             \
        cairn_status got_ = (call);                                                  \
        if (got_ != (want)) {                                                        \
            fprintf(stderr, "%s:%d: %s returned %d, expected %d (%s)\n", __FILE__,   \
                    __LINE__, #call, (int)got_, (int)(want), cairn_last_error());    \
            failures++;                                                              \
        }                                                                            \
    } while (0)

/* --- fixtures from runtime/tests/reference/smollm2-135m-instruct-q4_1.json --- */

static const char *HAIKU_RENDERED =
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n"
    "<|im_start|>assistant\n";
static const cairn_token HAIKU_IDS[] = {1,    9690, 198,  2683,  359,   253,   5356, 5646,
                                        11173, 3365, 3511, 308,   34519, 28,    7018, 411,
                                        407,  19712, 8182, 2,     198,   1,     4093, 198,
                                        19161, 253,  421,  30614, 563,   260,   3426, 30,
                                        2,    198,   1,    520,   9531,  198};
static const cairn_token FIB_PROMPT[] = {1604, 3987, 46477, 24, 94, 727};
/* llama.cpp's greedy continuation, as far as every choice wins by more than 0.25. */
static const cairn_token FIB_GREEDY[] = {472, 585, 304, 1758, 216, 32, 42, 448, 1003, 216, 33, 472, 1003};

#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

/* --- callbacks --- */

typedef struct {
    float seen[16];
    int n;
    int cancel_at; /* cancel on this call (or never if < 0) */
} progress_log;

static bool on_progress(float p, void *user_data) {
    progress_log *log = user_data;
    if (log->n < 16) log->seen[log->n] = p;
    log->n++;
    return log->cancel_at < 0 || log->n <= log->cancel_at;
}

typedef struct {
    cairn_token ids[256];
    size_t n;
    char text[4096];
    size_t text_len;
    size_t stop_after; /* return false after this many tokens (0: never) */
    cairn_context *ctx; /* when set, reenter it from the callback */
    cairn_status reentry_status;
} collector;

static bool on_token(cairn_token token, const char *piece, size_t len, void *user_data) {
    collector *c = user_data;
    if (token >= 0 && c->n < COUNT(c->ids)) c->ids[c->n++] = token;
    if (strlen(piece) != len) failures++, fprintf(stderr, "piece length mismatch\n");
    if (c->text_len + len < sizeof(c->text)) {
        memcpy(c->text + c->text_len, piece, len);
        c->text_len += len;
        c->text[c->text_len] = 0;
    }
    if (c->ctx) c->reentry_status = cairn_context_get_size(c->ctx, NULL, NULL);
    return c->stop_after == 0 || c->n < c->stop_after;
}

typedef struct {
    char last[512];
    int count;
} log_sink;

static void on_log(cairn_log_level level, const char *msg, void *user_data) {
    log_sink *s = user_data;
    (void)level;
    snprintf(s->last, sizeof s->last, "%s", msg);
    s->count++;
}

/* Abort from another thread: the token callback waits, after the first token, until
 * the other thread has called cairn_context_abort(), so the abort always lands
 * mid-generation. */
typedef struct {
    cairn_context *ctx;
    atomic_int first_token_seen;
    atomic_int abort_sent;
    cairn_status abort_status;
    size_t tokens;
} abort_state;

static void *abort_thread(void *arg) {
    abort_state *s = arg;
    while (!atomic_load(&s->first_token_seen)) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    s->abort_status = cairn_context_abort(s->ctx);
    atomic_store(&s->abort_sent, 1);
    return NULL;
}

static bool on_token_wait_abort(cairn_token token, const char *piece, size_t len, void *user_data) {
    abort_state *s = user_data;
    (void)token, (void)piece, (void)len;
    s->tokens++;
    atomic_store(&s->first_token_seen, 1);
    while (!atomic_load(&s->abort_sent)) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    return true;
}

/* --- tests --- */

static void test_library(void) {
    CHECK(strlen(cairn_version()) > 0);
    CHECK(strstr(cairn_build_info(), cairn_version()) != NULL);
    CHECK(cairn_abi_version() == CAIRN_ABI_VERSION);
    CHECK_STATUS(cairn_set_log_callback(NULL, NULL, 99), CAIRN_ERR_INVALID_ARGUMENT);
    CHECK(strstr(cairn_last_error(), "log level") != NULL);
}

static void test_load_errors(const char *model_path, const char *not_a_model) {
    cairn_model *m = (cairn_model *)0x1; /* must be reset to NULL on failure */
    cairn_model_params p = cairn_model_params_default();

    CHECK_STATUS(cairn_model_load(NULL, &p, &m), CAIRN_ERR_NULL_ARGUMENT);
    CHECK(m == NULL);
    CHECK_STATUS(cairn_model_load(model_path, &p, NULL), CAIRN_ERR_NULL_ARGUMENT);

    CHECK_STATUS(cairn_model_load("/nonexistent/model.gguf", &p, &m), CAIRN_ERR_IO);
    CHECK(m == NULL);
    CHECK(strstr(cairn_last_error(), "/nonexistent/model.gguf") != NULL);

    CHECK_STATUS(cairn_model_load("/", &p, &m), CAIRN_ERR_INVALID_ARGUMENT); /* a directory */
    CHECK_STATUS(cairn_model_load(not_a_model, &p, &m), CAIRN_ERR_FORMAT);
    CHECK(m == NULL);
    CHECK_STATUS(cairn_model_load("\xff\xfe", &p, &m), CAIRN_ERR_INVALID_ARGUMENT); /* not UTF-8 */

    p.backend = CAIRN_BACKEND_GPU;
    CHECK_STATUS(cairn_model_load(model_path, &p, &m), CAIRN_ERR_UNSUPPORTED);
    p.backend = 42;
    CHECK_STATUS(cairn_model_load(model_path, &p, &m), CAIRN_ERR_INVALID_ARGUMENT);
    p = cairn_model_params_default();
    p.memory_budget = 64u << 20;
    CHECK_STATUS(cairn_model_load(model_path, &p, &m), CAIRN_ERR_UNSUPPORTED);
    CHECK(strstr(cairn_last_error(), "BitStack") != NULL);
    CHECK(m == NULL);

    /* Cancel from the progress callback, at the first and at a later call. */
    for (int at = 0; at < 2; at++) {
        progress_log log = {.n = 0, .cancel_at = at};
        p = cairn_model_params_default();
        p.progress_callback = on_progress;
        p.progress_user_data = &log;
        CHECK_STATUS(cairn_model_load(model_path, &p, &m), CAIRN_ERR_CANCELLED);
        CHECK(m == NULL);
        CHECK(log.n == at + 1);
    }
}

static cairn_model *test_load(const char *model_path) {
    log_sink sink = {{0}, 0};
    CHECK_STATUS(cairn_set_log_callback(on_log, &sink, CAIRN_LOG_INFO), CAIRN_OK);
    progress_log log = {.n = 0, .cancel_at = -1};
    cairn_model_params p = cairn_model_params_default();
    p.n_threads = 2;
    p.progress_callback = on_progress;
    p.progress_user_data = &log;
    cairn_model *m = NULL;
    CHECK_STATUS(cairn_model_load(model_path, &p, &m), CAIRN_OK);
    CHECK(m != NULL);
    CHECK(log.n >= 2 && log.seen[0] == 0.0f && log.seen[log.n - 1] == 1.0f);
    for (int i = 1; i < log.n && i < 16; i++) CHECK(log.seen[i] >= log.seen[i - 1]);
    CHECK(sink.count >= 1 && strstr(sink.last, "loaded") != NULL);
    CHECK_STATUS(cairn_set_log_callback(NULL, NULL, CAIRN_LOG_WARN), CAIRN_OK);
    return m;
}

static void test_model_info(cairn_model *m) {
    cairn_model_info info;
    CHECK_STATUS(cairn_model_get_info(m, &info), CAIRN_OK);
    CHECK(info.n_vocab == 49152);
    CHECK(info.n_ctx_train == 8192);
    CHECK(info.n_layer == 30 && info.n_embd == 576);
    CHECK(info.token_eos == 2);
    CHECK(info.has_chat_template);
    CHECK(!info.supports_memory_budget);
    CHECK_STATUS(cairn_model_get_info(m, NULL), CAIRN_ERR_NULL_ARGUMENT);
    CHECK_STATUS(cairn_model_get_info(NULL, &info), CAIRN_ERR_NULL_ARGUMENT);

    /* Sizing protocol: size 0 reports the length; one byte short is still too small. */
    size_t len = 0;
    CHECK_STATUS(cairn_model_describe(m, NULL, 0, &len), CAIRN_ERR_BUFFER_TOO_SMALL);
    CHECK(len > 0);
    char *buf = malloc(len + 1);
    memset(buf, 'x', len + 1);
    CHECK_STATUS(cairn_model_describe(m, buf, len, &len), CAIRN_ERR_BUFFER_TOO_SMALL);
    CHECK(buf[0] == 'x'); /* nothing written on failure */
    CHECK_STATUS(cairn_model_describe(m, buf, len + 1, &len), CAIRN_OK);
    CHECK(strlen(buf) == len && strstr(buf, "llama") != NULL);
    CHECK_STATUS(cairn_model_describe(m, NULL, 8, &len), CAIRN_ERR_NULL_ARGUMENT);
    free(buf);

    CHECK_STATUS(cairn_model_set_memory_budget(m, 100u << 20), CAIRN_ERR_UNSUPPORTED);
    CHECK(strstr(cairn_model_last_error(m), "not a BitStack model") != NULL);
    CHECK_STATUS(cairn_model_release_memory(m), CAIRN_OK);
}

static void test_text(cairn_model *m) {
    const char *text = "Hello, world! 1234567890";
    const cairn_token want[] = {19556, 28, 905, 17, 216, 33, 34, 35, 36, 37, 38, 39, 40, 41, 32};
    cairn_token ids[64];
    size_t n = 0;
    CHECK_STATUS(cairn_tokenize(m, text, strlen(text), true, true, ids, COUNT(ids), &n), CAIRN_OK);
    CHECK(n == COUNT(want) && memcmp(ids, want, sizeof want) == 0);

    /* Too small: the count is still reported, nothing written. */
    cairn_token small[4] = {-7, -7, -7, -7};
    size_t n2 = 0;
    CHECK_STATUS(cairn_tokenize(m, text, strlen(text), true, true, small, 4, &n2), CAIRN_ERR_BUFFER_TOO_SMALL);
    CHECK(n2 == COUNT(want) && small[0] == -7);
    CHECK_STATUS(cairn_tokenize(m, text, strlen(text), true, true, NULL, 0, &n2), CAIRN_ERR_BUFFER_TOO_SMALL);
    CHECK_STATUS(cairn_tokenize(m, NULL, 3, true, true, ids, COUNT(ids), &n2), CAIRN_ERR_NULL_ARGUMENT);
    CHECK_STATUS(cairn_tokenize(m, text, strlen(text), true, true, ids, COUNT(ids), NULL), CAIRN_ERR_NULL_ARGUMENT);
    CHECK_STATUS(cairn_tokenize(m, "\xc3\x28", 2, true, true, ids, COUNT(ids), &n2), CAIRN_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(cairn_tokenize(m, "", 0, true, true, NULL, 0, &n2), CAIRN_OK);
    CHECK(n2 == 0);

    /* Special tokens: parsed only when asked. */
    const char *special = "<|im_start|>user\nHi<|im_end|>\n";
    CHECK_STATUS(cairn_tokenize(m, special, strlen(special), false, true, ids, COUNT(ids), &n2), CAIRN_OK);
    CHECK(n2 == 6 && ids[0] == 1 && ids[4] == 2);
    CHECK_STATUS(cairn_tokenize(m, special, strlen(special), false, false, ids, COUNT(ids), &n2), CAIRN_OK);
    CHECK(n2 > 6 && ids[0] != 1);

    char out[128];
    size_t len = 0;
    CHECK_STATUS(cairn_detokenize(m, want, COUNT(want), out, sizeof out, &len), CAIRN_OK);
    CHECK(strcmp(out, text) == 0 && len == strlen(text));
    CHECK_STATUS(cairn_detokenize(m, want, COUNT(want), out, 5, &len), CAIRN_ERR_BUFFER_TOO_SMALL);
    CHECK(len == strlen(text));
    const cairn_token bad[] = {19556, 49152};
    CHECK_STATUS(cairn_detokenize(m, bad, 2, out, sizeof out, &len), CAIRN_ERR_INVALID_ARGUMENT);
    const cairn_token negative[] = {-1};
    CHECK_STATUS(cairn_detokenize(m, negative, 1, out, sizeof out, &len), CAIRN_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(cairn_detokenize(m, NULL, 2, out, sizeof out, &len), CAIRN_ERR_NULL_ARGUMENT);

    CHECK_STATUS(cairn_token_to_piece(m, 19556, out, sizeof out, &len), CAIRN_OK);
    CHECK(strcmp(out, "Hello") == 0 && len == 5);
    CHECK_STATUS(cairn_token_to_piece(m, 19556, out, 5, &len), CAIRN_ERR_BUFFER_TOO_SMALL);
    CHECK_STATUS(cairn_token_to_piece(m, 1 << 30, out, sizeof out, &len), CAIRN_ERR_INVALID_ARGUMENT);

    bool eog = false;
    CHECK_STATUS(cairn_token_is_eog(m, 2, &eog), CAIRN_OK);
    CHECK(eog);
    CHECK_STATUS(cairn_token_is_eog(m, 19556, &eog), CAIRN_OK);
    CHECK(!eog);
    CHECK_STATUS(cairn_token_is_eog(m, 19556, NULL), CAIRN_ERR_NULL_ARGUMENT);
}

static void test_chat_template(cairn_model *m) {
    cairn_chat_message msgs[] = {{"user", "Write a haiku about the sea."}};
    size_t len = 0;
    CHECK_STATUS(cairn_chat_apply_template(m, msgs, 1, true, NULL, 0, &len), CAIRN_ERR_BUFFER_TOO_SMALL);
    CHECK(len == strlen(HAIKU_RENDERED));
    char *buf = malloc(len + 1);
    CHECK_STATUS(cairn_chat_apply_template(m, msgs, 1, true, buf, len + 1, &len), CAIRN_OK);
    CHECK(strcmp(buf, HAIKU_RENDERED) == 0);

    cairn_token ids[64];
    size_t n = 0;
    CHECK_STATUS(cairn_tokenize(m, buf, len, false, true, ids, COUNT(ids), &n), CAIRN_OK);
    CHECK(n == COUNT(HAIKU_IDS) && memcmp(ids, HAIKU_IDS, sizeof HAIKU_IDS) == 0);
    free(buf);

    cairn_chat_message bad[] = {{"user", NULL}};
    CHECK_STATUS(cairn_chat_apply_template(m, bad, 1, true, NULL, 0, &len), CAIRN_ERR_NULL_ARGUMENT);
    CHECK(strstr(cairn_last_error(), "messages[0].content") != NULL);
    CHECK_STATUS(cairn_chat_apply_template(m, NULL, 1, true, NULL, 0, &len), CAIRN_ERR_NULL_ARGUMENT);
}

static void test_generate(cairn_model *m) {
    cairn_context_params cp = cairn_context_params_default();
    cairn_context *ctx = (cairn_context *)0x1;
    cp.gemfilter = true;
    CHECK_STATUS(cairn_context_new(m, &cp, &ctx), CAIRN_ERR_UNSUPPORTED);
    CHECK(ctx == NULL);
    cp = cairn_context_params_default();
    cp.n_ctx = 1u << 20;
    CHECK_STATUS(cairn_context_new(m, &cp, &ctx), CAIRN_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(cairn_context_new(NULL, &cp, &ctx), CAIRN_ERR_NULL_ARGUMENT);
    CHECK_STATUS(cairn_context_new(m, &cp, NULL), CAIRN_ERR_NULL_ARGUMENT);
    cp.n_ctx = 64;
    CHECK_STATUS(cairn_context_new(m, &cp, &ctx), CAIRN_OK);

    size_t n_ctx = 0, n_cached = 1;
    CHECK_STATUS(cairn_context_get_size(ctx, &n_ctx, &n_cached), CAIRN_OK);
    CHECK(n_ctx == 64 && n_cached == 0);

    /* Greedy continuation equals llama.cpp's. */
    cairn_sampler_params sp = cairn_sampler_params_greedy();
    collector c;
    memset(&c, 0, sizeof c);
    cairn_generation g;
    CHECK_STATUS(cairn_generate(ctx, FIB_PROMPT, COUNT(FIB_PROMPT), COUNT(FIB_GREEDY), &sp, on_token, &c, &g),
                 CAIRN_OK);
    CHECK(g.n_tokens == COUNT(FIB_GREEDY) && g.stop_reason == CAIRN_STOP_LENGTH && g.n_prompt_reused == 0);
    CHECK(c.n == COUNT(FIB_GREEDY) && memcmp(c.ids, FIB_GREEDY, sizeof FIB_GREEDY) == 0);
    CHECK(strncmp(c.text, "\n    if n == 0:\n        return", 30) == 0);
    CHECK_STATUS(cairn_context_get_size(ctx, NULL, &n_cached), CAIRN_OK);
    CHECK(n_cached == COUNT(FIB_PROMPT) + COUNT(FIB_GREEDY));

    /* The next turn reuses the cached prefix (prompt + what was generated). */
    cairn_token turn2[COUNT(FIB_PROMPT) + COUNT(FIB_GREEDY) + 1];
    memcpy(turn2, FIB_PROMPT, sizeof FIB_PROMPT);
    memcpy(turn2 + COUNT(FIB_PROMPT), FIB_GREEDY, sizeof FIB_GREEDY);
    turn2[COUNT(turn2) - 1] = 216;
    memset(&c, 0, sizeof c);
    c.stop_after = 3; /* and the callback stops it */
    CHECK_STATUS(cairn_generate(ctx, turn2, COUNT(turn2), 20, &sp, on_token, &c, &g), CAIRN_OK);
    CHECK(g.n_prompt_reused == COUNT(turn2) - 1);
    CHECK(g.stop_reason == CAIRN_STOP_CALLBACK && g.n_tokens == 3 && c.n == 3);

    /* Full context. */
    CHECK_STATUS(cairn_generate(ctx, FIB_PROMPT, COUNT(FIB_PROMPT), 1000, &sp, NULL, NULL, &g), CAIRN_OK);
    CHECK(g.stop_reason == CAIRN_STOP_CONTEXT_FULL || g.stop_reason == CAIRN_STOP_EOG);

    /* Re-entering the context from its own callback is reported, not a deadlock. */
    memset(&c, 0, sizeof c);
    c.ctx = ctx;
    c.stop_after = 1;
    CHECK_STATUS(cairn_generate(ctx, FIB_PROMPT, COUNT(FIB_PROMPT), 4, &sp, on_token, &c, &g), CAIRN_OK);
    CHECK(c.reentry_status == CAIRN_ERR_BUSY);

    /* Abort requested before the call: nothing is evaluated. */
    CHECK_STATUS(cairn_context_abort(ctx), CAIRN_OK);
    CHECK_STATUS(cairn_generate(ctx, FIB_PROMPT, COUNT(FIB_PROMPT), 4, &sp, NULL, NULL, &g), CAIRN_OK);
    CHECK(g.stop_reason == CAIRN_STOP_ABORTED && g.n_tokens == 0);

    /* Abort from another thread during generation. */
    CHECK_STATUS(cairn_context_clear(ctx), CAIRN_OK);
    abort_state s = {.ctx = ctx, .abort_status = 1, .tokens = 0};
    atomic_init(&s.first_token_seen, 0);
    atomic_init(&s.abort_sent, 0);
    pthread_t th;
    pthread_create(&th, NULL, abort_thread, &s);
    cairn_sampler_params sampled = cairn_sampler_params_default();
    sampled.seed = 7;
    CHECK_STATUS(cairn_generate(ctx, FIB_PROMPT, COUNT(FIB_PROMPT), 50, &sampled, on_token_wait_abort, &s, &g),
                 CAIRN_OK);
    pthread_join(th, NULL);
    CHECK(s.abort_status == CAIRN_OK);
    CHECK(g.stop_reason == CAIRN_STOP_ABORTED && g.n_tokens == 2 && s.tokens == 1);

    /* Bad generation arguments. */
    CHECK_STATUS(cairn_generate(NULL, FIB_PROMPT, 6, 4, &sp, NULL, NULL, &g), CAIRN_ERR_NULL_ARGUMENT);
    CHECK_STATUS(cairn_generate(ctx, NULL, 6, 4, &sp, NULL, NULL, &g), CAIRN_ERR_NULL_ARGUMENT);
    CHECK_STATUS(cairn_generate(ctx, FIB_PROMPT, 0, 4, &sp, NULL, NULL, &g), CAIRN_ERR_INVALID_ARGUMENT);
    const cairn_token outside[] = {1604, 60000};
    CHECK_STATUS(cairn_generate(ctx, outside, 2, 4, &sp, NULL, NULL, &g), CAIRN_ERR_INVALID_ARGUMENT);
    CHECK(strstr(cairn_context_last_error(ctx), "60000") != NULL);
    cairn_token too_long[65];
    for (int i = 0; i < 65; i++) too_long[i] = 28;
    CHECK_STATUS(cairn_generate(ctx, too_long, 65, 4, &sp, NULL, NULL, &g), CAIRN_ERR_INVALID_ARGUMENT);
    cairn_sampler_params bad = cairn_sampler_params_default();
    bad.top_p = 0.0f;
    CHECK_STATUS(cairn_generate(ctx, FIB_PROMPT, 6, 4, &bad, NULL, NULL, &g), CAIRN_ERR_INVALID_ARGUMENT);
    bad = cairn_sampler_params_default();
    bad.top_k = -1;
    CHECK_STATUS(cairn_generate(ctx, FIB_PROMPT, 6, 4, &bad, NULL, NULL, &g), CAIRN_ERR_INVALID_ARGUMENT);
    /* Still usable after all that. */
    CHECK_STATUS(cairn_generate(ctx, FIB_PROMPT, 6, 2, NULL, NULL, NULL, NULL), CAIRN_OK);

    /* Double free and use after free are reported. */
    CHECK_STATUS(cairn_context_free(ctx), CAIRN_OK);
    CHECK_STATUS(cairn_context_free(ctx), CAIRN_ERR_INVALID_HANDLE);
    CHECK_STATUS(cairn_context_abort(ctx), CAIRN_ERR_INVALID_HANDLE);
    CHECK_STATUS(cairn_generate(ctx, FIB_PROMPT, 6, 2, NULL, NULL, NULL, NULL), CAIRN_ERR_INVALID_HANDLE);
    CHECK(strcmp(cairn_context_last_error(ctx), "not a live context handle") == 0);
    CHECK_STATUS(cairn_context_free(NULL), CAIRN_OK);
    /* A model handle is not a context, and a made-up pointer is neither. */
    CHECK_STATUS(cairn_context_free((cairn_context *)m), CAIRN_ERR_INVALID_HANDLE);
    CHECK_STATUS(cairn_model_free((cairn_model *)&failures), CAIRN_ERR_INVALID_HANDLE);
}

static void test_lifetimes(const char *model_path) {
    /* A context outlives its freed model. */
    cairn_model *m = NULL;
    cairn_model_params p = cairn_model_params_default();
    p.n_threads = 1;
    CHECK_STATUS(cairn_model_load(model_path, &p, &m), CAIRN_OK);
    cairn_context_params cp = cairn_context_params_default();
    cp.n_ctx = 32;
    cairn_context *ctx = NULL;
    CHECK_STATUS(cairn_context_new(m, &cp, &ctx), CAIRN_OK);
    CHECK_STATUS(cairn_model_free(m), CAIRN_OK);
    CHECK_STATUS(cairn_model_free(m), CAIRN_ERR_INVALID_HANDLE);
    cairn_model_info info;
    CHECK_STATUS(cairn_model_get_info(m, &info), CAIRN_ERR_INVALID_HANDLE);
    cairn_sampler_params sp = cairn_sampler_params_greedy();
    collector c;
    memset(&c, 0, sizeof c);
    cairn_generation g;
    CHECK_STATUS(cairn_generate(ctx, FIB_PROMPT, COUNT(FIB_PROMPT), 3, &sp, on_token, &c, &g), CAIRN_OK);
    CHECK(g.n_tokens == 3 && memcmp(c.ids, FIB_GREEDY, 3 * sizeof(cairn_token)) == 0);
    CHECK_STATUS(cairn_context_free(ctx), CAIRN_OK);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s MODEL.gguf NOT_A_MODEL_FILE\n", argv[0]);
        return 2;
    }
    test_library();
    test_load_errors(argv[1], argv[2]);
    cairn_model *m = test_load(argv[1]);
    if (m) {
        test_model_info(m);
        test_text(m);
        test_chat_template(m);
        test_generate(m);
        CHECK_STATUS(cairn_model_free(m), CAIRN_OK);
    }
    test_lifetimes(argv[1]);
    size_t live_models = 1, live_contexts = 1;
    CHECK_STATUS(cairn_live_handles(&live_models, &live_contexts), CAIRN_OK);
    CHECK(live_models == 0 && live_contexts == 0);
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("all C API tests passed\n");
    return 0;
}
