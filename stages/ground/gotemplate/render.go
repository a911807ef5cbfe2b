// Renders an Ollama TEMPLATE with Go's text/template, the engine Ollama itself uses, over the
// data Ollama gives it: .Messages (Role, Content), .System, .Prompt.
// Usage: render TEMPLATE_FILE < messages.json (stages/ground/ollama.py builds and runs it)
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Values struct {
	Messages []Message
	System   string
	Prompt   string
}

func main() {
	text, err := os.ReadFile(os.Args[1])
	if err != nil {
		panic(err)
	}
	var values Values
	if err := json.NewDecoder(os.Stdin).Decode(&values.Messages); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("ollama").Parse(string(text)))
	if err := tmpl.Execute(os.Stdout, values); err != nil {
		panic(err)
	}
}
