package ai.cairn;

import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;

/**
 * Host test of the JNI layer: the calls the Kotlin facade makes, against the default
 * model (SmolLM2-135M-Instruct Q4_1) and llama.cpp's reference outputs for it. Plain
 * Java with a main (no JUnit: Maven Central is out of reach of CI); run by
 * android/jni/tests/java.rs. Usage: CairnNativeTest MODEL.gguf
 */
public final class CairnNativeTest {
    private static int checks = 0;

    private static void check(boolean ok, String what) {
        checks++;
        if (!ok) throw new AssertionError(what);
    }

    private interface Body {
        void run() throws Exception;
    }

    private static CairnException expectCairn(int status, Body body) throws Exception {
        try {
            body.run();
        } catch (CairnException e) {
            check(e.status == status, "expected status " + status + ", got " + e.status + ": " + e.getMessage());
            return e;
        }
        throw new AssertionError("expected CairnException " + status);
    }

    static final int[] FIB_PROMPT = {1604, 3987, 46477, 24, 94, 727};
    static final int[] FIB_GREEDY = {472, 585, 304, 1758, 216, 32, 42, 448, 1003, 216, 33, 472, 1003};

    public static void main(String[] args) throws Exception {
        String path = args[0];
        check(!CairnNative.version().isEmpty(), "version");
        check(CairnNative.buildInfo().contains(CairnNative.version()), "build info");

        // Load errors.
        CairnException e = expectCairn(CairnException.IO, () -> CairnNative.modelLoad("/nonexistent.gguf", 0, false, 0, null));
        check(e.getMessage().contains("/nonexistent.gguf"), "message names the path");
        expectCairn(CairnException.NULL_ARGUMENT, () -> CairnNative.modelLoad(null, 0, false, 0, null));
        e = expectCairn(CairnException.UNSUPPORTED, () -> CairnNative.modelLoad(path, 0, false, 1 << 26, null));
        check(e.getMessage().contains("BitStack"), "budget message");
        List<Float> seen = new ArrayList<>();
        expectCairn(CairnException.CANCELLED, () -> CairnNative.modelLoad(path, 0, false, 0, p -> {
            seen.add(p);
            return false;
        }));
        check(seen.size() == 1 && seen.get(0) == 0f, "cancelled at the first progress call");
        try {
            CairnNative.modelLoad(path, 0, false, 0, p -> {
                throw new IllegalStateException("from the progress callback");
            });
            throw new AssertionError("the callback's exception must propagate");
        } catch (IllegalStateException expected) {
            check(expected.getMessage().equals("from the progress callback"), "callback exception rethrown");
        }

        // Load.
        seen.clear();
        long model = CairnNative.modelLoad(path, 2, false, 0, p -> seen.add(p));
        check(model != 0, "model handle");
        check(seen.get(0) == 0f && seen.get(seen.size() - 1) == 1f, "progress from 0 to 1: " + seen);
        check(CairnNative.modelDescribe(model).contains("llama"), "describe");
        expectCairn(CairnException.UNSUPPORTED, () -> CairnNative.modelSetMemoryBudget(model, 100L << 20));
        CairnNative.modelReleaseMemory(model);

        // Text, including characters outside the BMP (JNI's modified UTF-8 must not leak).
        check(Arrays.equals(CairnNative.tokenize(model, "Hello, world! 1234567890", true, true),
                new int[] {19556, 28, 905, 17, 216, 33, 34, 35, 36, 37, 38, 39, 40, 41, 32}), "tokenize");
        String uni = "Ünïcödé — “quotes” and emoji 🚀🦀";
        int[] uniIds = CairnNative.tokenize(model, uni, true, true);
        check(Arrays.equals(uniIds, new int[] {142, 246, 94, 25972, 83, 7466, 84, 2756, 1841, 619, 385, 2346, 573, 284,
                649, 33777, 15107, 244, 218, 10813, 116, 218}), "tokenize unicode: " + Arrays.toString(uniIds));
        check(CairnNative.detokenize(model, uniIds).equals(uni), "detokenize unicode");
        expectCairn(CairnException.INVALID_ARGUMENT, () -> CairnNative.detokenize(model, new int[] {1 << 20}));
        expectCairn(CairnException.NULL_ARGUMENT, () -> CairnNative.tokenize(model, null, true, true));

        String rendered = CairnNative.applyChatTemplate(model, new String[] {"user"},
                new String[] {"Write a haiku about the sea."}, true);
        check(rendered.equals("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
                + "Face<|im_end|>\n<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n"),
                "chat template");
        expectCairn(CairnException.INVALID_ARGUMENT,
                () -> CairnNative.applyChatTemplate(model, new String[] {"user"}, new String[0], true));

        // Generation: llama.cpp's greedy continuation.
        long ctx = CairnNative.contextNew(model, 64);
        List<Integer> got = new ArrayList<>();
        StringBuilder text = new StringBuilder();
        int reason = CairnNative.generate(ctx, FIB_PROMPT, FIB_GREEDY.length, 0f, 40, 0.95f, 0.05f, 1f, 1,
                (token, piece) -> {
                    got.add(token);
                    text.append(piece);
                    return true;
                });
        check(reason == CairnNative.STOP_LENGTH, "stop reason " + reason);
        check(got.stream().mapToInt(Integer::intValue).toArray().length == FIB_GREEDY.length
                && Arrays.equals(got.stream().mapToInt(Integer::intValue).toArray(), FIB_GREEDY), "greedy ids " + got);
        check(text.toString().startsWith("\n    if n == 0:\n        return"), "greedy text " + text);

        // A callback that stops, and one that throws.
        got.clear();
        reason = CairnNative.generate(ctx, FIB_PROMPT, 20, 0f, 40, 0.95f, 0.05f, 1f, 1, (token, piece) -> {
            got.add(token);
            return got.size() < 3;
        });
        check(reason == CairnNative.STOP_CALLBACK && got.size() == 3, "callback stop");
        try {
            CairnNative.generate(ctx, FIB_PROMPT, 20, 0f, 40, 0.95f, 0.05f, 1f, 1, (token, piece) -> {
                throw new IllegalArgumentException("from the token callback");
            });
            throw new AssertionError("the callback's exception must propagate");
        } catch (IllegalArgumentException expected) {
            check(expected.getMessage().equals("from the token callback"), "token callback exception rethrown");
        }
        reason = CairnNative.generate(ctx, FIB_PROMPT, 2, 0f, 40, 0.95f, 0.05f, 1f, 1, null);
        check(reason == CairnNative.STOP_LENGTH, "usable after a callback threw");

        // Abort from another thread while the generation waits in its callback.
        CountDownLatch first = new CountDownLatch(1);
        CountDownLatch aborted = new CountDownLatch(1);
        Thread t = new Thread(() -> {
            try {
                first.await();
                CairnNative.contextAbort(ctx);
                aborted.countDown();
            } catch (InterruptedException ignored) {
            }
        });
        t.start();
        int[] calls = {0};
        reason = CairnNative.generate(ctx, FIB_PROMPT, 50, 0.8f, 40, 0.95f, 0.05f, 1f, 7, (token, piece) -> {
            calls[0]++;
            first.countDown();
            try {
                check(aborted.await(60, TimeUnit.SECONDS), "abort thread finished");
            } catch (InterruptedException ex) {
                throw new RuntimeException(ex);
            }
            return true;
        });
        t.join();
        check(reason == CairnNative.STOP_ABORTED && calls[0] == 1, "aborted after one token: " + reason + ", " + calls[0]);

        // Lifetimes: double free and stale handles are reported.
        CairnNative.contextFree(ctx);
        expectCairn(CairnException.INVALID_HANDLE, () -> CairnNative.contextFree(ctx));
        expectCairn(CairnException.INVALID_HANDLE, () -> CairnNative.generate(ctx, FIB_PROMPT, 2, 0f, 40, 0.95f,
                0.05f, 1f, 1, null));
        expectCairn(CairnException.INVALID_HANDLE, () -> CairnNative.contextNew(12345, 0));
        CairnNative.modelFree(model);
        expectCairn(CairnException.INVALID_HANDLE, () -> CairnNative.modelFree(model));
        expectCairn(CairnException.INVALID_HANDLE, () -> CairnNative.tokenize(model, "x", true, true));
        System.out.println("all JNI tests passed (" + checks + " checks)");
    }
}
