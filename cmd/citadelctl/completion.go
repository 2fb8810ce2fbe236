package main

import "fmt"

// Completion scripts list commands, and model names from `citadelctl
// __models`, which asks the daemon (and prints nothing if it is down).
const bashCompletion = `# bash completion for citadelctl; source it or install it as
# /usr/share/bash-completion/completions/citadelctl
_citadelctl() {
    local cur=${COMP_WORDS[COMP_CWORD]} cmd="" i
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${COMP_WORDS[i]} in
            --socket|-o) ((i++)) ;;
            -*) ;;
            *) cmd=${COMP_WORDS[i]}; break ;;
        esac
    done
    if [[ -z $cmd ]]; then
        COMPREPLY=($(compgen -W "status start stop restart reset reload logs health gpus completion help" -- "$cur"))
        return
    fi
    case $cmd in
        status|start|stop|restart|reset|logs)
            COMPREPLY=($(compgen -W "$(citadelctl __models 2>/dev/null) all" -- "$cur")) ;;
        completion) COMPREPLY=($(compgen -W "bash zsh" -- "$cur")) ;;
    esac
}
complete -F _citadelctl citadelctl
`

const zshCompletion = `#compdef citadelctl
# zsh completion for citadelctl; put it on $fpath as _citadelctl
_citadelctl() {
    local -a cmds models
    cmds=(status start stop restart reset reload logs health gpus completion help)
    if (( CURRENT == 2 )); then
        _describe 'command' cmds
        return
    fi
    case $words[2] in
        status|start|stop|restart|reset|logs)
            models=(${(f)"$(citadelctl __models 2>/dev/null)"} all)
            _describe 'model' models ;;
        completion) _values 'shell' bash zsh ;;
    esac
}
_citadelctl "$@"
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
