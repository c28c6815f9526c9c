package ai.cairn

import java.io.Closeable
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.channels.awaitClose
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.callbackFlow
import kotlinx.coroutines.flow.flowOn
import kotlinx.coroutines.launch

/** Sampling settings; the defaults are llama.cpp's. `temperature <= 0` is greedy. */
data class SamplerParams(
    val temperature: Float = 0.8f,
    val topK: Int = 40,
    val topP: Float = 0.95f,
    val minP: Float = 0.05f,
    val repeatPenalty: Float = 1.0f,
    val seed: Long = 0x5EED,
)

data class ChatMessage(val role: String, val content: String)

/**
 * A loaded model. Thread-safe; close it when done (contexts keep it alive until they
 * are closed too). Errors are [CairnException]s carrying the C ABI's status code.
 */
class CairnModel private constructor(private var handle: Long) : Closeable {
    companion object {
        /** Loads on the calling thread: call it from a background dispatcher. */
        fun load(
            path: String,
            threads: Int = 0,
            exact: Boolean = false,
            onProgress: ((Float) -> Boolean)? = null,
        ): CairnModel = CairnModel(
            CairnNative.modelLoad(path, threads, exact, 0, onProgress?.let { f -> CairnNative.ProgressCallback { f(it) } }),
        )

        val version: String get() = CairnNative.version()
    }

    internal val live: Long get() = handle.also { check(it != 0L) { "model is closed" } }

    val description: String get() = CairnNative.modelDescribe(live)

    /** BitStack models only: throws [CairnException] with UNSUPPORTED for the others. */
    fun setMemoryBudget(bytes: Long) = CairnNative.modelSetMemoryBudget(live, bytes)

    /** Call from `onTrimMemory`: drops resident weight pages (re-read from the file). */
    fun releaseMemory() = CairnNative.modelReleaseMemory(live)

    fun tokenize(text: String, addSpecial: Boolean = true, parseSpecial: Boolean = false): IntArray =
        CairnNative.tokenize(live, text, addSpecial, parseSpecial)

    fun detokenize(tokens: IntArray): String = CairnNative.detokenize(live, tokens)

    /** Null when the model has no chat template (chat in raw completion then). */
    fun applyChatTemplate(messages: List<ChatMessage>, addAssistant: Boolean = true): String? = try {
        CairnNative.applyChatTemplate(
            live, messages.map { it.role }.toTypedArray(), messages.map { it.content }.toTypedArray(), addAssistant,
        )
    } catch (e: CairnException) {
        if (e.status == CairnException.NO_TEMPLATE) null else throw e
    }

    fun newContext(nCtx: Int = 0): CairnContext = CairnContext(this, CairnNative.contextNew(live, nCtx))

    @Synchronized
    override fun close() {
        if (handle != 0L) CairnNative.modelFree(handle)
        handle = 0
    }
}

/** One conversation's state. Use from one coroutine at a time; [abort] from anywhere. */
class CairnContext internal constructor(val model: CairnModel, private var handle: Long) : Closeable {
    private val live: Long get() = handle.also { check(it != 0L) { "context is closed" } }

    /**
     * Tokens of the reply to [prompt] (the whole conversation: the prefix already held is
     * reused) as they are generated, on [Dispatchers.IO]. Cancelling the collector aborts
     * the generation.
     */
    fun generate(prompt: IntArray, maxTokens: Int = 256, sampler: SamplerParams = SamplerParams()): Flow<String> =
        callbackFlow {
            val job = launch(Dispatchers.IO) {
                try {
                    CairnNative.generate(
                        live, prompt, maxTokens, sampler.temperature, sampler.topK, sampler.topP, sampler.minP,
                        sampler.repeatPenalty, sampler.seed,
                    ) { _, piece ->
                        if (piece.isNotEmpty()) trySend(piece)
                        !isClosedForSend
                    }
                    close()
                } catch (e: Throwable) {
                    close(e)
                }
            }
            awaitClose {
                if (job.isActive) abort()
            }
        }.flowOn(Dispatchers.IO)

    /** A chat turn: renders [messages] with the template (raw text without one). */
    fun chat(messages: List<ChatMessage>, maxTokens: Int = 256, sampler: SamplerParams = SamplerParams()): Flow<String> {
        val rendered = model.applyChatTemplate(messages)
        val ids = if (rendered != null) {
            model.tokenize(rendered, addSpecial = false, parseSpecial = true)
        } else {
            model.tokenize(messages.joinToString("") { it.content })
        }
        return generate(ids, maxTokens, sampler)
    }

    /** Thread-safe: stops the running generation after its current token. */
    fun abort() {
        val h = handle
        if (h != 0L) CairnNative.contextAbort(h)
    }

    /** Frees the KV cache (memory pressure, or a new conversation). */
    fun clear() = CairnNative.contextClear(live)

    @Synchronized
    override fun close() {
        if (handle != 0L) CairnNative.contextFree(handle)
        handle = 0
    }
}
