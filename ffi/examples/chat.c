/* A multi-turn chat over the Cairn C API: each line on stdin is a user turn; the reply
 * streams to stdout as it is generated. The whole conversation is rendered with the
 * model's chat template every turn; the context reuses the prefix it already holds, so
 * only the new turn is evaluated.
 *
 *   cc -std=c11 -Iffi/include ffi/examples/chat.c -Ltarget/release -lcairn_ffi -o chat
 *   ./chat [-n MAX_TOKENS] [-s SEED] [-c N_CTX] MODEL.gguf
 */
#include "cairn.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    char *text;
    size_t len, cap;
} buffer;

static void append(buffer *b, const char *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        b->cap = (b->len + n + 1) * 2;
        b->text = realloc(b->text, b->cap);
        if (!b->text) abort();
    }
    memcpy(b->text + b->len, s, n);
    b->len += n;
    b->text[b->len] = 0;
}

static bool on_token(cairn_token token, const char *piece, size_t len, void *user_data) {
    (void)token;
    fwrite(piece, 1, len, stdout);
    fflush(stdout);
    append(user_data, piece, len);
    return true;
}

static int fail(const char *what, cairn_status s) {
    fprintf(stderr, "error: %s failed (%d): %s\n", what, (int)s, cairn_last_error());
    return 1;
}

static char *dup_str(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (!d) abort();
    return memcpy(d, s, n);
}

int main(int argc, char **argv) {
    size_t max_tokens = 256;
    unsigned long long seed = 0;
    unsigned n_ctx = 2048;
    const char *path = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-n") && i + 1 < argc) max_tokens = strtoul(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "-s") && i + 1 < argc) seed = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "-c") && i + 1 < argc) n_ctx = strtoul(argv[++i], NULL, 10);
        else path = argv[i];
    }
    if (!path) {
        fprintf(stderr, "usage: %s [-n MAX_TOKENS] [-s SEED] [-c N_CTX] MODEL.gguf\n", argv[0]);
        return 2;
    }
    fprintf(stderr, "%s\n", cairn_build_info());

    cairn_model *model = NULL;
    cairn_status s = cairn_model_load(path, NULL, &model);
    if (s != CAIRN_OK) return fail("loading the model", s);
    cairn_context_params cp = cairn_context_params_default();
    cp.n_ctx = n_ctx;
    cairn_context *ctx = NULL;
    s = cairn_context_new(model, &cp, &ctx);
    if (s != CAIRN_OK) return fail("creating the context", s);
    cairn_sampler_params sp = cairn_sampler_params_default();
    if (seed) sp.seed = seed;

    cairn_chat_message msgs[64];
    size_t n_msgs = 0;
    buffer prompt = {0}, raw = {0};
    cairn_token *ids = NULL;
    size_t ids_cap = 0;
    char line[4096];
    int rc = 0;
    while (n_msgs + 2 <= 64 && fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        if (!line[0]) break;
        printf("user> %s\nassistant> ", line);
        msgs[n_msgs++] = (cairn_chat_message){"user", dup_str(line)};

        /* The conversation as text: the template's rendering, or raw completion. */
        size_t len = 0;
        s = cairn_chat_apply_template(model, msgs, n_msgs, true, NULL, 0, &len);
        bool templated = s == CAIRN_ERR_BUFFER_TOO_SMALL;
        prompt.len = 0;
        if (templated) {
            append(&prompt, "", 0);
            if (prompt.cap < len + 1) {
                prompt.cap = len + 1;
                prompt.text = realloc(prompt.text, prompt.cap);
                if (!prompt.text) abort();
            }
            s = cairn_chat_apply_template(model, msgs, n_msgs, true, prompt.text, prompt.cap, &len);
            if (s != CAIRN_OK) { rc = fail("applying the chat template", s); break; }
            prompt.len = len;
        } else if (s == CAIRN_ERR_NO_TEMPLATE) {
            append(&raw, line, strlen(line));
            append(&prompt, raw.text, raw.len);
        } else { rc = fail("applying the chat template", s); break; }

        size_t n_ids = 0;
        s = cairn_tokenize(model, prompt.text, prompt.len, !templated, true, ids, ids_cap, &n_ids);
        if (s == CAIRN_ERR_BUFFER_TOO_SMALL) {
            ids_cap = n_ids;
            ids = realloc(ids, ids_cap * sizeof *ids);
            if (!ids) abort();
            s = cairn_tokenize(model, prompt.text, prompt.len, !templated, true, ids, ids_cap, &n_ids);
        }
        if (s != CAIRN_OK) { rc = fail("tokenizing", s); break; }

        buffer reply = {0};
        append(&reply, "", 0);
        cairn_generation g;
        s = cairn_generate(ctx, ids, n_ids, max_tokens, &sp, on_token, &reply, &g);
        printf("\n");
        if (s != CAIRN_OK) { free(reply.text); rc = fail("generating", s); break; }
        fprintf(stderr, "[%zu tokens, %zu prompt tokens reused, stop reason %d]\n", g.n_tokens,
                g.n_prompt_reused, (int)g.stop_reason);
        if (!templated) append(&raw, reply.text, reply.len);
        msgs[n_msgs++] = (cairn_chat_message){"assistant", reply.text};
    }
    for (size_t i = 0; i < n_msgs; i++) free((char *)msgs[i].content);
    free(prompt.text);
    free(raw.text);
    free(ids);
    cairn_context_free(ctx);
    cairn_model_free(model);
    return rc;
}
