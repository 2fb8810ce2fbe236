package main

import "fmt"

// Completion scripts complete commands, flags (global and per command),
// the values of --socket and -o, and model names from `citadelctl
// __models`, which asks the daemon (and prints nothing if it is down). The
// --socket the user typed is passed on to __models, so names come from the
// daemon being talked to. TestCompletionBash and TestCompletionZsh run them.
const bashCompletion = `# bash completion for citadelctl; source it or install it as
# /usr/share/bash-completion/completions/citadelctl
_citadelctl() {
    local cur=${COMP_WORDS[COMP_CWORD]} cmd="" i w
    local -a global=()
    for ((i = 1; i < COMP_CWORD; i++)); do
        w=${COMP_WORDS[i]}
        case $w in
            --socket|-socket|-o|--o)
                # --socket=PATH arrives as three words: --socket, =, PATH
                [[ ${COMP_WORDS[i+1]} == "=" ]] && ((i++))
                if [[ $w == *socket ]] && ((i + 1 < COMP_CWORD)); then
                    global=(--socket "${COMP_WORDS[i+1]/#\~/$HOME}")
                fi
                ((i++)) ;;
            -*) ;;
            *) cmd=$w; break ;;
        esac
    done
    local prev=${COMP_WORDS[COMP_CWORD-1]}
    [[ $prev == "=" ]] && prev=${COMP_WORDS[COMP_CWORD-2]}
    [[ $cur == "=" ]] && cur=""
    case $prev in
        --socket|-socket) COMPREPLY=($(compgen -f -- "$cur")); return ;;
        -o|--o) COMPREPLY=($(compgen -W "table json" -- "$cur")); return ;;
        --by|-by) COMPREPLY=($(compgen -W "key model" -- "$cur")); return ;;
    esac
    if [[ $cur == -* ]]; then
        local flags="-o --help"
        case $cmd in
            "") flags="--socket -o --version --help" ;;
            status) flags="-l -o --help" ;;
            stop|upgrade) flags="--timeout -o --help" ;;
            logs) flags="-n -f -o --help" ;;
            usage) flags="--by -o --help" ;;
        esac
        COMPREPLY=($(compgen -W "$flags" -- "$cur"))
        return
    fi
    local cmds="status start stop restart reset sleep wake reload upgrade logs health gpus usage fleet completion help"
    if [[ -z $cmd ]]; then
        COMPREPLY=($(compgen -W "$cmds" -- "$cur"))
        return
    fi
    case $cmd in
        status|start|stop|restart|reset|sleep|wake)
            COMPREPLY=($(compgen -W "$(citadelctl "${global[@]}" __models 2>/dev/null) all" -- "$cur")) ;;
        logs)
            COMPREPLY=($(compgen -W "$(citadelctl "${global[@]}" __models 2>/dev/null)" -- "$cur")) ;;
        completion) COMPREPLY=($(compgen -W "bash zsh" -- "$cur")) ;;
        fleet) COMPREPLY=($(compgen -W "haproxy" -- "$cur")) ;;
        help) COMPREPLY=($(compgen -W "$cmds" -- "$cur")) ;;
    esac
}
complete -F _citadelctl citadelctl
`

const zshCompletion = `#compdef citadelctl
# zsh completion for citadelctl; put it on $fpath as _citadelctl, or
# source it after compinit
_citadelctl() {
    local -a cmds global models
    local i=2 cmd="" w
    cmds=(status start stop restart reset sleep wake reload upgrade logs health gpus usage fleet completion help)
    while (( i < CURRENT )); do
        w=$words[i]
        case $w in
            --socket|-socket)
                (( i + 1 < CURRENT )) && global=(--socket "${~words[i+1]}")
                (( i += 2 )); continue ;;
            --socket=*|-socket=*) global=("$w") ;;
            -o|--o) (( i += 2 )); continue ;;
            -*) ;;
            *) cmd=$w; break ;;
        esac
        (( i++ ))
    done
    case $words[CURRENT-1] in
        --socket|-socket) _files; return ;;
        -o|--o) compadd -- table json; return ;;
        --by|-by) compadd -- key model; return ;;
    esac
    if [[ $PREFIX == -* ]]; then
        case $cmd in
            "") compadd -- --socket -o --version --help ;;
            status) compadd -- -l -o --help ;;
            stop|upgrade) compadd -- --timeout -o --help ;;
            logs) compadd -- -n -f -o --help ;;
            usage) compadd -- --by -o --help ;;
            *) compadd -- -o --help ;;
        esac
        return
    fi
    if [[ -z $cmd ]]; then
        compadd -a cmds
        return
    fi
    case $cmd in
        status|start|stop|restart|reset|sleep|wake)
            models=(${(f)"$(citadelctl "${global[@]}" __models 2>/dev/null)"} all)
            compadd -a models ;;
        logs)
            models=(${(f)"$(citadelctl "${global[@]}" __models 2>/dev/null)"})
            compadd -a models ;;
        completion) compadd -- bash zsh ;;
        fleet) compadd -- haproxy ;;
        help) compadd -a cmds ;;
    esac
}
if [[ $zsh_eval_context[-1] == loadautofunc ]]; then
    _citadelctl "$@"
else
    compdef _citadelctl citadelctl
fi
`

func (c *cli) completion(args []string) int {
	if len(args) != 1 {
		fmt.Fprintln(c.err, "usage: citadelctl completion bash|zsh")
		return exitUsage
	}
	switch args[0] {
	case "bash":
		fmt.Fprint(c.out, bashCompletion)
	case "zsh":
		fmt.Fprint(c.out, zshCompletion)
	default:
		fmt.Fprintf(c.err, "citadelctl completion: %q: use bash or zsh\n", args[0])
		return exitUsage
	}
	return exitOK
}
