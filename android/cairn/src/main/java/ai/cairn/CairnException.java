package ai.cairn;

/** A failed Cairn call: the C ABI's status code and message. */
public class CairnException extends RuntimeException {
    public static final int NULL_ARGUMENT = -1;
    public static final int INVALID_HANDLE = -2;
    public static final int INVALID_ARGUMENT = -3;
    public static final int BUFFER_TOO_SMALL = -4;
    public static final int IO = -5;
    public static final int FORMAT = -6;
    public static final int MODEL = -7;
    public static final int TEXT = -8;
    public static final int NO_TEMPLATE = -9;
    public static final int UNSUPPORTED = -10;
    public static final int CANCELLED = -11;
    public static final int BUSY = -12;
    public static final int CALLBACK = -13;
    public static final int INTERNAL = -14;

    private static final long serialVersionUID = 1L;

    public final int status;

    public CairnException(int status, String message) {
        super(message + " (status " + status + ")");
        this.status = status;
    }
}
