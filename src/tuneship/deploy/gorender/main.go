// gorender renders an Ollama TEMPLATE with Go's own text/template, as Ollama does.
// Input (stdin, JSON): {"template": "...", "system": "...", "messages": [{"role": "...", "content": "..."}]}
// Output (stdout): the rendered prompt.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Input struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	Messages []Message `json:"messages"`
}

func main() {
	var input Input
	if err := json.NewDecoder(os.Stdin).Decode(&input); err != nil {
		fmt.Fprintln(os.Stderr, "bad input:", err)
		os.Exit(2)
	}
	tmpl, err := template.New("ollama").Parse(input.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "template parse error:", err)
		os.Exit(3)
	}
	data := map[string]any{"System": input.System, "Messages": input.Messages, "Prompt": "", "Response": ""}
	if err := tmpl.Execute(os.Stdout, data); err != nil {
		fmt.Fprintln(os.Stderr, "template execute error:", err)
		os.Exit(4)
	}
}
