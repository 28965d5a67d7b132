# The options scripts/install.sh and scripts/vllm_env.sh share, sourced by both (after their `usage`): sets CUDA
# (--cuda) and LOCKED (0 with --unlocked); --help prints the usage, anything else is refused with exit code 2.
CUDA=0
LOCKED=1
for arg in "$@"; do
    case "$arg" in
        --cuda) CUDA=1 ;;
        --unlocked) LOCKED=0 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "$(basename "$0"): unknown option '$arg'" >&2; usage >&2; exit 2 ;;
    esac
done
