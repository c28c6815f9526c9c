// Swift-friendly Cairn: throwing calls, classes that free their handles, token streams.
// A thin layer over the C ABI (ffi/include/cairn.h), which documents every call.
import CairnFFI
import Foundation

public struct CairnError: Error, CustomStringConvertible {
    /// The C ABI's status code (CAIRN_ERR_*).
    public let status: Int32
    public let message: String
    public var description: String { "\(message) (status \(status))" }
}

@inline(__always)
func check(_ status: cairn_status) throws {
    if status != CAIRN_OK {
        throw CairnError(status: status, message: String(cString: cairn_last_error()))
    }
}

/// Calls a sizing C function twice: for the length, then into a buffer of that size.
func readText(_ call: (UnsafeMutablePointer<CChar>?, Int, UnsafeMutablePointer<Int>) -> cairn_status) throws -> String {
    var len = 0
    let first = call(nil, 0, &len)
    if first != CAIRN_ERR_BUFFER_TOO_SMALL { try check(first) }
    var buf = [CChar](repeating: 0, count: len + 1)
    try check(buf.withUnsafeMutableBufferPointer { call($0.baseAddress, $0.count, &len) })
    return String(cString: buf)
}

public struct ChatMessage {
    public var role: String
    public var content: String
    public init(role: String, content: String) { self.role = role; self.content = content }
}

/// A loaded model; thread-safe. Freed when the last reference (including contexts) goes.
public final class Model: @unchecked Sendable {
    let handle: OpaquePointer

    public init(path: String, threads: UInt32 = 0) throws {
        var params = cairn_model_params_default()
        params.n_threads = threads
        var out: OpaquePointer?
        try check(cairn_model_load(path, &params, &out))
        handle = out!
    }

    deinit { cairn_model_free(handle) }

    /// BitStack models only: others throw CAIRN_ERR_UNSUPPORTED.
    public func setMemoryBudget(_ bytes: UInt64) throws { try check(cairn_model_set_memory_budget(handle, bytes)) }

    /// Call on a memory warning: drops resident weight pages (re-read when needed).
    public func releaseMemory() throws { try check(cairn_model_release_memory(handle)) }

    public func tokenize(_ text: String, addSpecial: Bool = true, parseSpecial: Bool = false) throws -> [Int32] {
        let utf8 = Array(text.utf8)
        var n = 0
        var ids = [Int32]()
        for _ in 0..<2 {
            let status = utf8.withUnsafeBufferPointer { t in
                ids.withUnsafeMutableBufferPointer { b in
                    cairn_tokenize(handle, UnsafeRawPointer(t.baseAddress)?.assumingMemoryBound(to: CChar.self) ?? "",
                                   t.count, addSpecial, parseSpecial, b.baseAddress, b.count, &n)
                }
            }
            if status == CAIRN_ERR_BUFFER_TOO_SMALL && ids.count < n { ids = [Int32](repeating: 0, count: n); continue }
            try check(status)
            break
        }
        return Array(ids.prefix(n))
    }

    public func detokenize(_ tokens: [Int32]) throws -> String {
        try tokens.withUnsafeBufferPointer { t in
            try readText { cairn_detokenize(handle, t.baseAddress, t.count, $0, $1, $2) }
        }
    }

    /// nil when the model has no chat template.
    public func applyChatTemplate(_ messages: [ChatMessage], addAssistant: Bool = true) throws -> String? {
        let roles = messages.map { strdup($0.role) }, contents = messages.map { strdup($0.content) }
        defer { (roles + contents).forEach { free($0) } }
        let msgs = zip(roles, contents).map { cairn_chat_message(role: $0, content: $1) }
        do {
            return try msgs.withUnsafeBufferPointer { m in
                try readText { cairn_chat_apply_template(handle, m.baseAddress, m.count, addAssistant, $0, $1, $2) }
            }
        } catch let e as CairnError where e.status == CAIRN_ERR_NO_TEMPLATE {
            return nil
        }
    }
}

/// One conversation's state. Use from one task at a time; `abort()` from anywhere.
public final class Context: @unchecked Sendable {
    public let model: Model
    let handle: OpaquePointer

    public init(model: Model, contextLength: UInt32 = 0) throws {
        var params = cairn_context_params_default()
        params.n_ctx = contextLength
        var out: OpaquePointer?
        try check(cairn_context_new(model.handle, &params, &out))
        self.model = model
        handle = out!
    }

    deinit { cairn_context_free(handle) }

    public func abort() { cairn_context_abort(handle) }

    public func clear() throws { try check(cairn_context_clear(handle)) }

    /// The reply to `prompt` (the whole conversation; the cached prefix is reused), piece by
    /// piece, generated on a background thread. Cancelling the consuming task aborts it.
    public func generate(_ prompt: [Int32], maxTokens: Int = 256,
                         sampler: cairn_sampler_params = cairn_sampler_params_default()) -> AsyncThrowingStream<String, Error> {
        AsyncThrowingStream { continuation in
            final class Box { let c: AsyncThrowingStream<String, Error>.Continuation; init(_ c: AsyncThrowingStream<String, Error>.Continuation) { self.c = c } }
            let box = Box(continuation)
            continuation.onTermination = { [weak self] reason in
                if case .cancelled = reason { self?.abort() }
            }
            Thread.detachNewThread { [self] in
                var sampler = sampler
                var result = cairn_generation()
                let status = prompt.withUnsafeBufferPointer { p in
                    cairn_generate(handle, p.baseAddress, p.count, maxTokens, &sampler, { _, piece, len, user in
                        let box = Unmanaged<Box>.fromOpaque(user!).takeUnretainedValue()
                        if len > 0, let piece { box.c.yield(String(cString: piece)) }
                        return true
                    }, Unmanaged.passUnretained(box).toOpaque(), &result)
                }
                if status == CAIRN_OK {
                    continuation.finish()
                } else {
                    continuation.finish(throwing: CairnError(status: status, message: String(cString: cairn_context_last_error(handle))))
                }
            }
        }
    }

    /// A chat turn: the conversation rendered with the model's template (raw text without one).
    public func chat(_ messages: [ChatMessage], maxTokens: Int = 256) throws -> AsyncThrowingStream<String, Error> {
        let ids: [Int32]
        if let rendered = try model.applyChatTemplate(messages) {
            ids = try model.tokenize(rendered, addSpecial: false, parseSpecial: true)
        } else {
            ids = try model.tokenize(messages.map(\.content).joined())
        }
        return generate(ids, maxTokens: maxTokens)
    }
}
