package ai.cairn;

/**
 * The JNI surface of Cairn: one static native method per C ABI call, handles as longs.
 * The Kotlin facade ({@code Cairn.kt}) is the API for apps; this class is what it calls,
 * and what the host test drives directly. Handles are checked ids, never raw pointers:
 * a freed or made-up handle throws {@link CairnException} with
 * {@link CairnException#INVALID_HANDLE}, it cannot crash the process.
 */
public final class CairnNative {
    static {
        String path = System.getProperty("cairn.library.path");
        if (path != null) {
            System.load(path);
        } else {
            System.loadLibrary("cairn_jni");
        }
    }

    private CairnNative() {}

    /** Load progress in [0, 1]; return false to cancel. */
    public interface ProgressCallback {
        boolean onProgress(float progress);
    }

    /**
     * Called on the generating thread for every token with the text it completes (empty
     * while a character is incomplete; token -1 for text held back at the end). Return
     * false to stop. An exception stops the generation and is rethrown to the caller.
     */
    public interface TokenCallback {
        boolean onToken(int token, String piece);
    }

    public static final int STOP_EOG = 0;
    public static final int STOP_LENGTH = 1;
    public static final int STOP_CONTEXT_FULL = 2;
    public static final int STOP_CALLBACK = 3;
    public static final int STOP_ABORTED = 4;

    public static native String version();

    public static native String buildInfo();

    /** Returns a model handle; {@code progress} may be null. */
    public static native long modelLoad(String path, int nThreads, boolean exact, long memoryBudget,
                                        ProgressCallback progress);

    public static native void modelFree(long model);

    public static native String modelDescribe(long model);

    /** Throws {@link CairnException#UNSUPPORTED} for models that are not BitStack. */
    public static native void modelSetMemoryBudget(long model, long bytes);

    public static native void modelReleaseMemory(long model);

    public static native int[] tokenize(long model, String text, boolean addSpecial, boolean parseSpecial);

    public static native String detokenize(long model, int[] tokens);

    /** Throws {@link CairnException#NO_TEMPLATE} when the model has no chat template. */
    public static native String applyChatTemplate(long model, String[] roles, String[] contents,
                                                  boolean addAssistant);

    /** Returns a context handle; {@code nCtx} 0 means the model's training context. */
    public static native long contextNew(long model, int nCtx);

    public static native void contextFree(long context);

    public static native void contextClear(long context);

    /** Any thread: stops the running (or next) generation on this context. */
    public static native void contextAbort(long context);

    /** Returns the stop reason ({@code STOP_*}); {@code callback} may be null. */
    public static native int generate(long context, int[] prompt, int maxTokens, float temperature, int topK,
                                      float topP, float minP, float repeatPenalty, long seed,
                                      TokenCallback callback);
}
